"""Image grids of IPES-GAN's generations, for a person to look at (PNG files and tensorboard)."""
import numpy as np
from PIL import Image, ImageDraw

# Rows of a grid, top to bottom: (label, key of IPESGAN.translate's output). Column j is pair j.
GRID_ROWS = (("source", "x_s"), ("target pose", "h_t"), ("target", "x_t"), ("S->G", "x_sg"),
             ("T->G", "x_tg"), ("S cycled", "x_s_cyc"), ("T cycled", "x_t_cyc"))
LABEL_WIDTH = 64


def _as_uint8(images):
    """(B, 3, H, W) in [-1, 1], or (B, 18, H, W) heatmaps (their maximum, grey) -> (B, H, W, 3)."""
    images = images.detach().float().cpu()
    if images.shape[1] != 3:
        images = images.amax(dim=1, keepdim=True).expand(-1, 3, -1, -1) * 2.0 - 1.0
    return ((images.clamp(-1, 1) + 1.0) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()


def translation_grid(views):
    """One uint8 (rows * H, LABEL_WIDTH + pairs * W, 3) image of ``GRID_ROWS`` for every pair of
    ``views`` (the output of IPESGAN.translate): source persons re-rendered in the target poses
    and styles (S->G), target persons in the source ones (T->G), and both cycled back."""
    rows = []
    for label, key in GRID_ROWS:
        tiles = _as_uint8(views[key])
        height = tiles.shape[1]
        caption = Image.new("RGB", (LABEL_WIDTH, height), (255, 255, 255))
        ImageDraw.Draw(caption).text((2, height // 2 - 5), label, fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(caption)] + list(tiles), axis=1))
    return np.concatenate(rows, axis=0)


def save_grid(grid, path):
    Image.fromarray(grid).save(path)
