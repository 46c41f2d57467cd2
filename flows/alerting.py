"""Alert on failure: a Prefect notification block and an automation that fires it for every failed run."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock

ALERT_NAME = "medvae-failure-alert"
# Crashed (the worker died, e.g. out of memory) and TimedOut fail a night's run as surely as Failed.
FAILED_STATES = ["prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"]


def failure_automation(block_document_id: Any, flow_names: tuple[str, ...] = ("medvae-*",)) -> Automation:
    """The automation: any medvae flow run that fails, crashes or times out sends one notification.

    Args:
        block_document_id: the id of a saved notification block (Slack, Teams, e-mail, a webhook ...).
        flow_names: flow-name patterns to watch (the pipeline and its stage flows by default).
    """
    return Automation(
        name=ALERT_NAME,
        description="medvae: notify the on-call channel when a medvae flow run fails",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(flow_names)},
            expect=set(FAILED_STATES),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="medvae run {{ flow_run.name }} {{ flow_run.state.name }}",
                body=(
                    "Flow {{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                    "{{ flow_run.state.message }}. No new store version was written by it."
                ),
            )
        ],
    )


def install_alert(webhook_url: str, block_name: str = "medvae-alerts") -> Automation:
    """Save a webhook notification block and (re)create the failure automation that uses it.

    For Slack, Teams or e-mail save that block type under ``block_name`` instead and pass its id to
    :func:`failure_automation`; any Prefect notification block works.

    Returns:
        The automation as stored by the Prefect server.
    """
    block = CustomWebhookNotificationBlock(
        name="medvae",
        url=webhook_url,
        json_data={"text": "{{subject}}: {{body}}"},
    )
    block_id = block.save(block_name, overwrite=True)
    with contextlib.suppress(ValueError):  # ValueError: not created yet
        Automation.read(name=ALERT_NAME).delete()
    return failure_automation(block_id).create()


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.alerting --webhook URL``: install the failure alert on the current Prefect API."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--webhook", required=True, help="URL that receives a JSON POST per failed run")
    ap.add_argument("--block-name", default="medvae-alerts")
    a = ap.parse_args(argv)
    auto = install_alert(a.webhook, a.block_name)
    print(f"automation {auto.name} ({auto.id}) notifies via block {a.block_name}")


if __name__ == "__main__":
    main()
