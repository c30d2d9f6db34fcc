"""The plain test-time loader every evaluation and initialisation shares: items in order at
fastreid's test transforms, on the calling process only (fastreid's own test loader shards by rank
and starts its own workers)."""
import torch
from fastreid.data.build import fast_batch_collator
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms


def plain_test_loader(cfg, items, batch_size=None):
    """Batches of ``items`` ((path, pid, camid, ...) tuples, labels kept as given) in order, at the
    test transforms ([0, 255] floats); ``batch_size`` defaults to TEST.IMS_PER_BATCH."""
    dataset = CommDataset(items, build_transforms(cfg, is_train=False), relabel=False)
    batch_size = cfg.TEST.IMS_PER_BATCH if batch_size is None else batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       shuffle=False, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                       collate_fn=fast_batch_collator)
