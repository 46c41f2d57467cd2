"""The Prefect deployment (prefect.yaml), its failure alert, and retries and timeouts on every task."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvae.config import PipelineConfig

REPO = Path(__file__).resolve().parents[2]
FLOW_MODULES = ["flows.ingest", "flows.train", "flows.augment", "flows.screen", "flows.pipeline"]


def _deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def _entry(entrypoint: str) -> object:
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_task_has_retries_and_a_timeout() -> None:
    from prefect import Task

    tasks = {
        f"{m}.{n}": obj
        for m in FLOW_MODULES
        for n, obj in vars(importlib.import_module(m)).items()
        if isinstance(obj, Task)
    }
    assert len(tasks) >= 14
    for name, t in tasks.items():
        assert t.retries >= 1, name
        assert t.timeout_seconds and t.timeout_seconds > 0, name


def test_prefect_yaml_entrypoints_and_parameters_validate() -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    deps = _deployments()
    assert {d["name"] for d in deps} == {"nightly", "screen-on-demand"}
    for d in deps:
        flow = _entry(d["entrypoint"])
        assert isinstance(flow, Flow), d["entrypoint"]
        flow.validate_parameters(d["parameters"])  # raises on a wrong or missing parameter
        for s in d.get("schedules", []):
            CronSchedule(cron=s["cron"], timezone=s["timezone"])
    nightly = next(d for d in deps if d["name"] == "nightly")
    cfg = PipelineConfig.model_validate(nightly["parameters"]["config"])
    assert cfg.runner.kind == "dask" and cfg.runner.address and nightly["concurrency_limit"] == 1


@pytest.mark.integration
def test_prefect_deploy_registers_the_scheduled_deployments(prefect_harness: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.actions import WorkPoolCreate

        client.create_work_pool(WorkPoolCreate(name="medvae-gpu", type="process"), overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "MEDVAE_HOME": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("medvae-pipeline/nightly")
        screen = client.read_deployment_by_name("medvae-screen/screen-on-demand")
    assert nightly.work_pool_name == "medvae-gpu" and screen.work_pool_name == "medvae-gpu"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["config"]["runner"]["kind"] == "dask"
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)


@pytest.mark.integration
def test_failure_alert_watches_failed_crashed_and_timed_out_runs(prefect_harness: None) -> None:
    from prefect.automations import Automation

    from flows.alerting import ALERT_NAME, install_alert

    auto = install_alert("http://127.0.0.1:9/medvae-alert", block_name="medvae-alerts-test")
    stored = Automation.read(name=ALERT_NAME)
    assert stored.id == auto.id and stored.enabled
    assert set(stored.trigger.expect) == {
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",
        "prefect.flow-run.TimedOut",
    }
    assert stored.actions[0].type == "send-notification"
    # Installing again replaces it instead of stacking a second alert.
    install_alert("http://127.0.0.1:9/medvae-alert", block_name="medvae-alerts-test")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(ALERT_NAME)) == 1


def test_prefect_yaml_points_at_sections_that_exist() -> None:
    import re

    for line in (REPO / "prefect.yaml").read_text().splitlines():
        for doc, section in re.findall(r"([\w/]+\.md) \(\"([^\"]+)\"\)", line):
            assert section in (REPO / doc).read_text(), (doc, section)
    assert re.search(r"[\w/]+\.md \(\"", (REPO / "prefect.yaml").read_text()), "prefect.yaml names its guide"
