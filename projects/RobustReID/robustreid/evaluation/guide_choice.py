"""Which split's clean features are an attack's guide set in robust evaluation.

Each attack follows its reference (the attacked split is the query set unless ``attack_gallery``):

* FNA, FNA_PULL (Bouniot et al. 2020; DDDefense eq. 3, "A = the query set during inference"): the
  attacked split itself; its rows name the attacked samples (robust evaluation's FNA counts its own
  row among its push guides, as Bouniot et al.'s code: ``robust.EVALUATION_OPTIONS``).
* The metric I-FGSM family FGSM/IFGSM/MIFGSM/NIFGSM/SINIFGSM (Bai et al. 2020's AMA) and WMA (thesis
  eq. 4.3): the clean split the attacked one is ranked against, so that an attacked query is pushed
  away from its true matches in the gallery (Bai et al.'s code attacks the gallery and takes every
  same-ID query as a guide). ``TEST.ROBUST.GUIDES`` / ``--guides`` may name the split of these
  attacks instead: "gallery" or "query" ("query" with queries attacked is RobustReID's earlier
  I-FGSM, each query's other same-ID queries as guides: one guide per query on SynthReID).

Every same-ID guide counts, junk included (a gallery image of the query's identity and camera, which
the ranking ignores): both references take all same-ID images of the other split, cameras ignored.
"""
from ..attacks.metric import IFGSM
from ..attacks.wasserstein import WMA
from ..config import ConfigError

GUIDE_SPLITS = ("gallery", "query")
RETRIEVAL_GUIDED = (IFGSM, WMA)  # attacks whose reference guide set is the other split


def check_guides(value, option):
    """``value`` if it is "" (each attack's reference) or a split name, else ConfigError naming
    ``option``."""
    if value not in ("", *GUIDE_SPLITS):
        raise ConfigError(f"{option} must be one of {list(GUIDE_SPLITS)} or '' (each attack's "
                          f"reference guide set), got {value!r}")
    return value


def guide_split_name(attack, guides, attacked):
    """The name of the split ("query"/"gallery") whose clean features guide ``attack`` when the
    ``attacked`` split is perturbed; ``guides`` is the :func:`check_guides` setting."""
    if not isinstance(attack, RETRIEVAL_GUIDED):
        return attacked
    if guides:
        return guides
    return "gallery" if attacked == "query" else "query"
