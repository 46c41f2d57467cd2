"""The self-contained HTML report: ``templates/report.html.j2`` rendered with the metrics and the figures.

Figures are embedded as PNG data URIs, so the one file can be mailed or archived. The report can show
real test images (the galleries, the reconstruction grids): it is the operator's evaluation of their own
data and belongs in the evaluation's output folder, never in a model directory.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvae._io import atomic_write_text
from medvae.eval.metrics import fmt_msd

TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class Figure:
    """One PNG of the report.

    Attributes:
        path: the PNG (left out of the report when it does not exist, e.g. a grid a tiny split cannot fill).
        caption: one sentence under it.
    """

    path: Path
    caption: str

    def data_uri(self) -> str:
        """The PNG as a ``data:`` URI."""
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _ci(v: Any, digits: int = 3, percent: bool = False) -> str:
    if not v:
        return "n/a"
    lo, hi = v
    return f"[{_pct(lo, digits)}, {_pct(hi, digits)}]" if percent else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,  # a renamed metric must fail the render, not leave a blank cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update({"msd": fmt_msd, "num": _num, "pct": _pct, "ci": _ci})
    return env


def render_report(metrics: dict[str, Any], figures: dict[str, Figure]) -> str:
    """The report as HTML text.

    Args:
        metrics: the evaluation's JSON metrics (as written to ``metrics.json``).
        figures: PNGs by role (``"roc"``, ``"pr"``, ``"confusion"``, ``"gallery_fp"``, ...); the template
            places the known roles and lists every other figure under "More figures".

    Returns:
        A complete HTML document.
    """
    present = {k: {"src": f.data_uri(), "caption": f.caption} for k, f in figures.items() if f.path.exists()}
    return str(_environment().get_template(TEMPLATE).render(m=metrics, fig=present))


def write_report(metrics: dict[str, Any], figures: dict[str, Figure], path: Path) -> Path:
    """Render the report and write it atomically to ``path``."""
    return atomic_write_text(Path(path), render_report(metrics, figures))
