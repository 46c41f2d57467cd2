"""The stage jobs that the CLI and the Prefect flows call: each joins the store to one stage.

- :mod:`medvae.jobs.train`: a store version -> a trained, calibrated model directory;
- :mod:`medvae.jobs.augment`: synthetic, privacy-filtered rows as a new store version;
- :mod:`medvae.jobs.screen`: new scans -> scores, flags, a CSV and heat maps;
- :mod:`medvae.jobs.pipeline`: the pipeline's scoring of the store and its one commit;
- :mod:`medvae.jobs.results`: the typed results they return.
"""
