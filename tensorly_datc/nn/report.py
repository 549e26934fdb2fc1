"""The report of a model compression: one row per layer considered, and totals."""

from dataclasses import asdict, dataclass, field

__all__ = ["LayerReport", "CompressionReport"]


@dataclass
class LayerReport:
    """Outcome of compressing one layer.

    Attributes
    ----------
    name : str
        Name of the layer in ``model.named_modules()``.
    layer : str
        Short description of the original layer, such as ``'Conv2d(16, 32, 3x3)'``.
    compressed : bool
        Whether the layer was replaced.
    method : str or None
        'tucker2', 'cp4', 'cp3' or 'lowrank' for a replaced layer.
    rank : int, tuple of int or None
        (R_T, R_S) for Tucker-2 (mode order: output channels, input channels), an int
        otherwise.
    params_before, params_after : int
        Parameters of the layer and of its replacement (equal when not replaced).
    macs_before, macs_after : int or None
        Multiply-accumulates for one input of the size seen in calibration (or given), None
        when no input size is known.
    metric_error : float or None
        Relative error ``||(W - W~) Sigma^{1/2}|| / ||W Sigma^{1/2}||`` in the layer's input
        second moment (the relative change of the layer's output on calibration data), None
        without statistics.
    frobenius_error : float or None
        Relative Frobenius error ``||W - W~|| / ||W||``.
    reason : str
        Why a layer was skipped, or notes on how it was fitted.
    """

    name: str
    layer: str
    compressed: bool
    method: str = None
    rank: object = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = None
    macs_after: int = None
    metric_error: float = None
    frobenius_error: float = None
    reason: str = ""


def _format_count(value):
    if value is None:
        return "-"
    if value >= 10**6:
        return f"{value / 10**6:.2f}M"
    if value >= 10**3:
        return f"{value / 10**3:.1f}k"
    return str(value)


def _format_rank(rank):
    if rank is None:
        return "-"
    if isinstance(rank, (tuple, list)):
        return "(" + ", ".join(str(r) for r in rank) + ")"
    return str(rank)


def _format_error(error):
    return "-" if error is None else f"{error:.4f}"


@dataclass
class CompressionReport:
    """Per-layer results of :func:`tensorly_datc.nn.compress`, printable as a table.

    Attributes
    ----------
    layers : list of LayerReport
        Every layer considered, in model order, compressed or skipped.
    method, norm, calibration : str
        The options of the compression.
    """

    layers: list = field(default_factory=list)
    method: str = ""
    norm: str = ""
    calibration: str = ""

    @property
    def compressed(self):
        """Rows of the replaced layers."""
        return [row for row in self.layers if row.compressed]

    @property
    def skipped(self):
        """Rows of the layers left unchanged."""
        return [row for row in self.layers if not row.compressed]

    def totals(self):
        """Return the sums over the replaced layers: parameters and MACs before and after."""
        rows = self.compressed
        totals = {
            "params_before": sum(row.params_before for row in rows),
            "params_after": sum(row.params_after for row in rows),
        }
        known_macs = rows and all(row.macs_before is not None for row in rows)
        totals["macs_before"] = sum(row.macs_before for row in rows) if known_macs else None
        totals["macs_after"] = sum(row.macs_after for row in rows) if known_macs else None
        return totals

    def to_dict(self):
        """Return the report as plain Python data (for JSON)."""
        return {
            "method": self.method,
            "norm": self.norm,
            "calibration": self.calibration,
            "layers": [asdict(row) for row in self.layers],
            "totals": self.totals(),
        }

    def __str__(self):
        header = ("layer", "type", "method", "rank", "params", "MACs", "metric err", "frob err")
        lines = []
        for row in self.compressed:
            lines.append((
                row.name, row.layer, row.method, _format_rank(row.rank),
                f"{_format_count(row.params_before)} -> {_format_count(row.params_after)}",
                f"{_format_count(row.macs_before)} -> {_format_count(row.macs_after)}",
                _format_error(row.metric_error), _format_error(row.frobenius_error),
            ))
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

        def render(cells):
            return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

        text = [f"Compression with {self.method}, norm={self.norm}, calibration={self.calibration}",
                render(header), render(["-" * width for width in widths])]
        text += [render(line) for line in lines]
        totals = self.totals()
        if lines:
            ratio = totals["params_after"] / max(totals["params_before"], 1)
            summary = (f"total over {len(lines)} compressed layers: params "
                       f"{_format_count(totals['params_before'])} -> "
                       f"{_format_count(totals['params_after'])} ({ratio:.1%})")
            if totals["macs_before"]:
                mac_ratio = totals["macs_after"] / totals["macs_before"]
                summary += (f", MACs {_format_count(totals['macs_before'])} -> "
                            f"{_format_count(totals['macs_after'])} ({mac_ratio:.1%})")
            text.append(summary)
        for row in self.skipped:
            text.append(f"skipped {row.name} ({row.layer}): {row.reason}")
        return "\n".join(text)
