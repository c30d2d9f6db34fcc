"""The identity-preservation measure of IPES-GAN's generated views (issue 16): views that are the
source person retrieve that person far above chance, views of another person do not.

Showing it on a *trained* IPES generator takes longer than a test may (0.8 s per iteration of the
test-sized model on the shared CPU, hundreds of iterations): tools/uda_eval.py --identity-pairs
reports it for a trained run (README, "IPES-GAN (UDA)")."""
import pytest

from robustreid.data.ipes import PosedImages
from robustreid.data.keypoints import SynthReIDKeypoints
from robustreid.data.validation import build_dataset
from robustreid.evaluation.ipes_identity import identity_preservation


class Renders:
    """A stand-in generator whose I_S->G is the source image itself, or the target's."""

    def __init__(self, copy_source):
        self.copy_source = copy_source
        self.training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def translate(self, source, target):
        return {"x_sg": (source if self.copy_source else target)["images"] / 127.5 - 1.0}


def torso_colour(images):
    """A frozen 'ReID model' for SynthReID: the mean colour of the torso region."""
    return images[:, :, 16:36, 10:22].mean(dim=(2, 3))


def posed(name):
    return PosedImages(build_dataset(name).train, SynthReIDKeypoints(), (64, 32), sigma=1.5)


def test_identity_preservation_of_copies_and_of_other_people(datasets_root):
    source, target = posed("SynthReIDTiny_D0"), posed("SynthReIDTiny_D2")
    kept = identity_preservation(Renders(True), torso_colour, source, target, pairs=40, seed=1,
                                 batch_size=16)
    assert kept["pairs"] == 40 and 5 < kept["chance"] < 20  # 12 identities, long-tailed
    assert kept["rank1"] > 4 * kept["chance"]
    lost = identity_preservation(Renders(False), torso_colour, source, target, pairs=40, seed=1,
                                 batch_size=16)
    assert lost["chance"] == pytest.approx(kept["chance"])  # same draws
    assert lost["rank1"] < kept["rank1"] / 2
    model = Renders(True)
    identity_preservation(model, torso_colour, source, target, pairs=2)
    assert model.training  # mode restored
