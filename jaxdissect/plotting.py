"""The one matplotlib set-up: the Agg backend (files only, no display needed), figures closed once saved."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **savefig_kwargs):
    """``fig.savefig(path, **savefig_kwargs)``, then close ``fig`` (pyplot keeps every open figure); returns ``path``."""
    fig.savefig(path, **savefig_kwargs)
    pyplot().close(fig)
    return path
