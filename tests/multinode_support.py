"""One "machine" of a two-machine run for tests/test_distributed.py (one process per machine):

    python tests/multinode_support.py train [tools/train_net.py's arguments]
        train_net's cli() as it is; its main() also saves what its rank trained to
        $MULTINODE_STATE_DIR/rank<r>.pth
    python tests/multinode_support.py report OUT_DIR [--num-machines, --machine-rank, --dist-url]
        fastreid's launch() (as train_net calls it) of a worker that writes OUT_DIR/rank<r>.json:
        its world size, an all-reduce and the local addresses of its TCP connections once gloo
        has connected the processes (Linux /proc). Also a worker of torchrun.
"""
import json
import os
import socket
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import train_net  # noqa: E402  (tools/train_net.py; imports robustreid: compat patches applied)

TRAIN_NET_MAIN = train_net.main


def main_saving_state(args):
    """train_net.main(args), then every trainable part's state as this rank holds it."""
    from fastreid.utils import comm

    from robustreid.parallel import unwrap

    trainers = []
    build_trainer = train_net.build_trainer

    def build_and_keep(cfg):
        trainers.append(build_trainer(cfg))
        return trainers[-1]

    train_net.build_trainer = build_and_keep
    TRAIN_NET_MAIN(args)
    (trainer,) = trainers
    state = {name: part.state_dict() for name, part in trainer.checkpointer.checkpointables.items()}
    state["model"] = unwrap(trainer.model).state_dict()
    torch.save(state, os.path.join(os.environ["MULTINODE_STATE_DIR"], f"rank{comm.get_rank()}.pth"))


def connection_addresses():
    """The local IPv4 addresses of this process's established TCP connections."""
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    addresses = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[9] in sockets and fields[3] == "01":  # ESTABLISHED
                address = int(fields[1].split(":")[0], 16)
                addresses.add(socket.inet_ntoa(struct.pack("<I", address)))
    return sorted(addresses)


def report_process(out_dir):
    import torch.distributed as dist
    from fastreid.utils import comm

    total = torch.ones(1)
    if comm.get_world_size() > 1:
        dist.all_reduce(total)
        comm.all_gather(comm.get_rank())  # fastreid's object gathers (their own gloo group)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"world_size": comm.get_world_size(), "sum": total.item(),
                   "addresses": connection_addresses(),
                   "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME")}, f)
    comm.synchronize()  # no process closes its connections before the other has looked at its own


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_net.main = main_saving_state
        sys.exit(train_net.cli(sys.argv[2:]))
    args = train_net.default_argument_parser().parse_args(sys.argv[3:])
    train_net.launch(report_process, args.num_gpus, num_machines=args.num_machines,
                     machine_rank=args.machine_rank, dist_url=args.dist_url, args=(sys.argv[2],))
