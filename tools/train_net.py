#!/usr/bin/env python
"""Train or evaluate a RobustReID model: fastreid's train_net CLI, on CPU or GPU.

    python tools/train_net.py --config-file configs/SynthReID/bagtricks_R18.yml [KEY VALUE ...]
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR
    python tools/train_net.py --config-file CFG --num-gpus 2      # 2 processes (gloo on CPU)
    python tools/train_net.py --config-file CFG --num-gpus 4 --num-machines 2 --machine-rank R \
        --dist-url tcp://HOST0:PORT                              # on each machine (README)

On a CPU-only machine --num-gpus is the number of training processes per machine; under torchrun
each process it starts is one of them (README, "Multi-node training"). A run stopped by Ctrl-C or an
error writes its last finished epoch (no evaluation, no model selection) and says how to resume;
--resume then continues it exactly, as if it had never stopped.
"""
import sys
import traceback

import robustreid  # noqa: F401  (applies compat patches, registers everything)
from fastreid.engine import default_argument_parser
from robustreid import rendezvous
from robustreid.engine import (USER_ERRORS, RobustTrainer, build_config, build_trainer,
                               check_resume, launch, last_checkpoint, preflight, setup)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = RobustTrainer.load_for_eval(cfg)
        return RobustTrainer.test(cfg, model)
    trainer = build_trainer(cfg)  # IPESTrainer for IPES.ENABLED configs
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def resume_hint(cfg):
    path = last_checkpoint(cfg.OUTPUT_DIR)
    if not path:
        return "no checkpoint was written: nothing to resume"
    return f"to continue, rerun with --resume (before the KEY VALUE options): it resumes {path}"


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    cfg = None
    try:
        world_size = rendezvous.check_launch(args.num_gpus, args.num_machines, args.machine_rank,
                                             args.dist_url)
        # Validate config, weights and data once, in the launching process, before any worker starts.
        cfg = build_config(args)
        preflight(cfg, eval_only=args.eval_only, world_size=world_size)
        if args.resume and not args.eval_only:
            check_resume(cfg)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {resume_hint(cfg) if cfg and not args.eval_only else 'stopped'}",
              file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        if cfg is not None and not args.eval_only:
            print(f"error: training stopped: {resume_hint(cfg)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
