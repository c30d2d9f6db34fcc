"""Matplotlib set-up shared by the evaluation reports: files only, no display."""


def figure_axes(num):
    """(pyplot, figure, axes) with ``num`` side-by-side panels."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(num, 1), figsize=(6 * max(num, 1), 4.5), squeeze=False)
    return plt, fig, axes[0]


def save_figure(plt, fig, path):
    """Lay out, write (PNG, 120 dpi) and close ``fig``: figures are not kept open between reports."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
