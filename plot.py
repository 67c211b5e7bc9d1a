"""
Compare training runs by looking: one PNG with their train and val loss, val bits per byte and
learning rate against tokens seen, read from the log.jsonl that train.py writes in each out_dir.

    python plot.py out/biblia-pt out/biblia-pt-bf16            # -> runs.png
    python plot.py out/a out/b/log.jsonl --output=compare.png --x=step
    python plot.py out/cmp-adamw out/cmp-muon --x=minutes     # at equal wall-clock

Loss is per token, so runs with different tokenizers are compared on bits per byte (see eval.py).
A key a log does not have is left out of that run's lines; a resumed run's repeated steps count
once (the later lines win). Needs matplotlib (pip install matplotlib). --output names a new file: one
already there (an earlier plot) is replaced only with --overwrite.
"""
import math
import os
import sys

from mirim import out_dir
from mirim.atomic import claim_file, write_atomic  # never a half-written image under the real name
from mirim.configurator import ConfigError, configure

SERIES = [  # (panel title, [(log key, line style, label suffix)])
    ('loss (nats/token)', [('train_loss', '-', 'train'), ('val_loss', '--', 'val')]),
    ('val bits per byte', [('val_bpb', '-', '')]),
    ('learning rate', [('lr', '-', '')]),
]
X_LABELS = {'tokens': 'tokens seen', 'step': 'step', 'minutes': 'wall-clock minutes'}

# --key=value or --key value (configurator.py); the run folders may come first: plot.py out/a out/b
DEFAULTS = dict(
    runs=[],                  # run folders (out_dirs) or log.jsonl files
    output='runs.png',        # the image to write: .png, .svg or .pdf
    x='tokens',               # the x axis: tokens | step | minutes
    overwrite=False,          # replace the --output file if it is already there (refused otherwise)
)


def read_log(path):
    try:
        return out_dir.read_log(path)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def series(records, x_key, y_key):
    """(xs, ys) of the records that have both keys as finite numbers. x_key 'minutes': the run's
    elapsed time, to compare runs at equal wall-clock (side by side on one machine)."""
    if x_key == 'minutes':
        records = [{**r, 'minutes': r['elapsed'] / 60} for r in records if isinstance(r.get('elapsed'), (int, float))]
    points = [(r[x_key], r[y_key]) for r in records
              if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))
              and math.isfinite(r[y_key])]
    return [p[0] for p in points], [p[1] for p in points]


def run_names(paths):
    """Short names for the legend: the out_dir's name, with its parent when two runs share it."""
    dirs = [os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or '.') for p in paths]
    names = [os.path.basename(os.path.abspath(d)) for d in dirs]
    return [d if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def plot_runs(paths, output='runs.png', x_key='tokens'):
    """Draw every run into one figure and write it to output (PNG). Returns the output path."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = [(name, read_log(path)) for name, path in zip(run_names(paths), paths)]
    figure, axes = plt.subplots(1, len(SERIES), figsize=(6 * len(SERIES), 4.5))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    drawn = 0
    for (title, keys), axis in zip(SERIES, axes):
        for i, (name, records) in enumerate(runs):
            for key, style, suffix in keys:
                xs, ys = series(records, x_key, key)
                if xs:
                    axis.plot(xs, ys, style, color=colors[i % len(colors)], label=f"{name} {suffix}".strip(),
                              marker='o' if len(xs) == 1 else None)
                    drawn += 1
        axis.set_title(title)
        axis.set_xlabel(X_LABELS.get(x_key, x_key))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, 'not in the logs', ha='center', va='center', transform=axis.transAxes, color='gray')
    if not drawn:
        raise SystemExit(f"nothing to plot: no log line has {x_key!r} with "
                         f"{', '.join(k for _, keys in SERIES for k, _, _ in keys)}")
    if x_key == 'tokens':
        for axis in axes:
            axis.ticklabel_format(axis='x', style='sci', scilimits=(0, 3))
    figure.tight_layout()
    import io
    image = io.BytesIO()
    figure.savefig(image, format=image_format(output), dpi=110)
    plt.close(figure)
    try:
        write_atomic(output, image.getvalue())
    except OSError as e:
        raise SystemExit(f"plot.py: error: cannot write {output}: {e.strerror or e}") from None
    return output


def image_format(output):
    """The format the file name asks for: runs.png, runs.svg, runs.pdf."""
    extension = os.path.splitext(output)[1].lower().lstrip('.')
    if extension not in ('png', 'svg', 'pdf'):
        raise SystemExit(f"plot.py: error: --output={output}: name a .png, .svg or .pdf file")
    return extension


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith('-'):
        argv = ['--runs', *argv]  # plot.py out/a out/b --x=step: the run folders, named first
    try:
        options = configure(DEFAULTS, argv, help_source=__file__, required=('runs',), choices={'x': list(X_LABELS)},
                            usage="usage: python plot.py out/a out/b ... [--output=runs.png] [--overwrite] "
                                  "[--x=tokens|step|minutes]")
    except ConfigError as e:
        raise SystemExit(f"plot.py: error: {e}") from None
    image_format(options['output'])  # before reading the logs
    try:
        claim_file(options['output'], options['overwrite'], '--output')
    except ValueError as e:
        raise SystemExit(f"plot.py: error: {e}") from None
    output = plot_runs(options['runs'], options['output'], options['x'])
    print(f"wrote {output}")
    return output


if __name__ == '__main__':
    main()
