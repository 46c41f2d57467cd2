"""Thin Prefect flows over the medvae library: each task body is one call into `medvae`."""
