"""The 18-joint keypoint layout (COCO-18 / OpenPose order) shared by SynthReID's renderer and the
keypoint loaders (robustreid.data.keypoints documents it). Constants only: the renderer stays pure
numpy."""

KEYPOINT_NAMES = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow",
                  "l_wrist", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye",
                  "l_eye", "r_ear", "l_ear")
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
JOINT = {name: index for index, name in enumerate(KEYPOINT_NAMES)}
# Joint k of a mirrored image is joint FLIP_ORDER[k] of the original (left and right swap).
_OTHER_SIDE = {"r_": "l_", "l_": "r_"}
FLIP_ORDER = tuple(JOINT[_OTHER_SIDE[name[:2]] + name[2:]] if name[:2] in _OTHER_SIDE else index
                   for index, name in enumerate(KEYPOINT_NAMES))
# Visibility v (COCO's convention): visible, occluded (position estimated), absent (x, y ignored).
VISIBLE, OCCLUDED, ABSENT = 2, 1, 0
