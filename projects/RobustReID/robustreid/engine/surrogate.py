"""Transfer (black-box) attacks: craft on a surrogate model, evaluate on the target.

The surrogate is built by the engine (a trained fastreid model); the attacks only see its extractor.

The pattern::

    surrogate = build_surrogate_extractor("configs/X.yml", "surrogate.pth")
    attack = build_attack("FNA", surrogate, eps=8, steps=16)
    # guides must come from the surrogate: its clean features of the query set
    guides = GuideSet(surrogate_query_features, query_pids)
    adv01 = attack.perturb(queries01, pids, guides, sample_index)
    target_features = ReidFeatureExtractor(target_model)(adv01)   # then rank against the gallery
"""
from ..attacks import ReidFeatureExtractor
from ..config import load_config
from .defaults import RobustTrainer, resolve_device


def build_surrogate_extractor(config_file, weights, opts=(), defense=None):
    """A :class:`ReidFeatureExtractor` on the fastreid model of ``config_file`` (+ KEY VALUE
    ``opts``) with ``weights`` loaded, on the config's device (cpu when CUDA is absent)."""
    cfg = resolve_device(load_config(config_file, [*opts, "MODEL.WEIGHTS", weights]))
    return ReidFeatureExtractor(RobustTrainer.load_for_eval(cfg), defense=defense)
