"""
Turn a sharded checkpoint (a run trained with parallel='fsdp' saves out_dir/ckpt.dcp and best.dcp) into
one checkpoint file, to copy or share as one file:

    python consolidate.py --out_dir=out/big --output=out/big/model.pt [--checkpoint=best.pt]

sample.py, eval.py, export.py, serve.py and --init_from read a sharded checkpoint directly (the weights are
gathered as it loads), so this is only needed to move a model as one file. The file holds the whole
weights and everything else of the checkpoint but the optimizer state: a model to sample, evaluate,
export or fine-tune (--init_from=FILE), not a run to resume; the run resumes from its ckpt.dcp, on any
number of processes. An existing --output is replaced only with --overwrite.
"""
import os
import sys

from mirim.atomic import claim_file, save_atomic
from mirim.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, resolve
from mirim.configurator import ConfigError, configure

DEFAULTS = dict(
    out_dir='out',            # a training out_dir (its ckpt.dcp) or a sharded checkpoint folder
    checkpoint='ckpt.pt',     # in out_dir: ckpt.pt (latest: ckpt.dcp) or best.pt (best validation loss: best.dcp)
    output='',                # the file to write, e.g. out/big/model.pt
    overwrite=False,          # replace --output when it exists
)


def consolidate(source, output, checkpoint='ckpt.pt', overwrite=False):
    """Write the sharded checkpoint of `source` (an out_dir's `checkpoint`, or the folder itself) as one
    file `output`. -> the number of weights written. ValueError (CheckpointError) / OSError say what is wrong."""
    claim_file(output, overwrite, '--output')  # before the work
    kind, where = resolve(source, checkpoint)
    if kind != 'mirim' or not os.path.isdir(where):
        raise ValueError(f"{where} is not a sharded checkpoint (a run with parallel='fsdp' writes ckpt.dcp); a "
                         f"checkpoint file is one file already")
    ckpt = load_checkpoint(where)
    model = model_from_checkpoint(ckpt, where=where)  # every key and tensor checked before anything is written
    ckpt = {k: v for k, v in ckpt.items() if k != 'sharded'}
    save_atomic(ckpt, output)
    return model.num_params(non_embedding=False)


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)
    if not config['output']:
        raise ValueError("say where to write the checkpoint file: --output=FILE.pt")
    params = consolidate(config['out_dir'], config['output'], config['checkpoint'], config['overwrite'])
    print(f"wrote {config['output']}: {params:,} parameters, no optimizer state (sample.py, eval.py, export.py and "
          f"--init_from read it)")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (OSError, ValueError, ConfigError, CheckpointError) as e:
        sys.exit(f"consolidate.py: error: {e}")
