"""Multi-machine launch flags (robustreid/rendezvous.py, compat's multinode_rendezvous): where the
machines meet, one error line when they cannot, torchrun's variables, and the interface gloo binds
to. No process group is started here (tests/test_distributed.py runs two machines)."""
import socket

import pytest

from conftest import REPO
from robustreid import compat, rendezvous
from robustreid.config import ConfigError

CONFIG = f"{REPO}/configs/SynthReID/bagtricks_R18.yml"
TINY_DATA = ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.TESTS", "('SynthReIDTiny',)"]
TORCHRUN_2x2 = {"TORCHELASTIC_RUN_ID": "job", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture
def no_master(monkeypatch):
    for name in (*rendezvous.MASTER_VARIABLES, "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def test_fastreids_default_url_is_loopback_and_is_now_decided_at_launch():
    fastreid_parser = compat.original("multinode_rendezvous")["default_argument_parser"]
    assert fastreid_parser().parse_args([]).dist_url.startswith("tcp://127.0.0.1:")
    from fastreid.engine import default_argument_parser

    assert default_argument_parser().parse_args([]).dist_url is None
    assert default_argument_parser().parse_args(["--dist-url", "tcp://h:1"]).dist_url == "tcp://h:1"


@pytest.mark.parametrize("flags, message", [
    (["--num-machines", "2"], "--num-machines 2 needs the address of the machine with "
                              "--machine-rank 0: --dist-url tcp://HOST:PORT (or MASTER_ADDR"),
    (["--num-machines", "2", "--dist-url", "auto"], "--dist-url auto picks a free port of this "
                                                    "machine"),
    (["--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://127.0.0.1:29500"],
     "--machine-rank 2: must be in 0..1"),
    (["--num-machines", "2", "--dist-url", "tcp://no-such-host.invalid:29500"],
     "host 'no-such-host.invalid' does not resolve"),
    (["--num-machines", "2", "--dist-url", "tcp://127.0.0.1"], "expected tcp://HOST:PORT"),
    (["--num-gpus", "2", "--dist-url", "env://"], "not set: MASTER_ADDR, MASTER_PORT"),
    (["--num-gpus", "0"], "--num-gpus and --num-machines must be >= 1"),
])
def test_train_net_refuses_a_launch_that_cannot_meet_in_one_line(flags, message, no_master,
                                                                   tmp_path, capsys):
    """Before any work (no output directory, no process): fastreid waited at 127.0.0.1 for machines
    that never come, or failed an assert."""
    import train_net

    code = train_net.cli(["--config-file", CONFIG, *flags, *TINY_DATA,
                          "OUTPUT_DIR", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_robust_eval_refuses_a_launch_that_cannot_meet_in_one_line(no_master, tmp_path, capsys):
    import robust_eval

    code = robust_eval.main(["--config-file", CONFIG, "--num-machines", "2", "--output",
                             str(tmp_path / "out"), "MODEL.WEIGHTS", "/nonexistent.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--num-machines 2 needs the address" in err[0], err


def test_url_from_master_variables_else_fastreids_default_on_one_machine():
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert rendezvous.resolve_dist_url(None, 2, master) == "tcp://127.0.0.1:29500"
    assert rendezvous.resolve_dist_url("tcp://localhost:6000", 2, master) == "tcp://localhost:6000"
    assert rendezvous.resolve_dist_url("env://", 2, master) == "env://"
    assert rendezvous.resolve_dist_url(None, 1, {}) is None  # the launch keeps fastreid's URL
    assert rendezvous.resolve_dist_url("auto", 1, {}) == "auto"
    for url, env in (("udp://127.0.0.1:29500", {}), (None, {**master, "MASTER_PORT": "x"}),
                     ("env://", {**master, "MASTER_PORT": "x"})):
        with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
            rendezvous.resolve_dist_url(url, 2, env)


def test_torchruns_variables_decide_the_world():
    assert rendezvous.torchrun_process({}) is None
    job = rendezvous.torchrun_process(TORCHRUN_2x2)
    assert (job.rank, job.local_rank, job.world_size, job.local_world_size, job.node_rank,
            job.num_nodes) == (3, 1, 4, 2, 1, 2)
    assert rendezvous.world_size(1, 1, 0, TORCHRUN_2x2) == 4  # flags left out
    assert rendezvous.world_size(2, 2, 0, TORCHRUN_2x2) == 4  # flags that agree
    assert rendezvous.check_launch(1, 1, 0, "tcp://no-such-host.invalid:1", TORCHRUN_2x2) == 4
    assert not rendezvous.launches_rank0(0, TORCHRUN_2x2)
    assert rendezvous.launches_rank0(0, {}) and not rendezvous.launches_rank0(1, {})
    with pytest.raises(ConfigError, match=r"torchrun started 2 process\(es\) on each of 2 node"):
        rendezvous.world_size(4, 1, 0, TORCHRUN_2x2)
    with pytest.raises(ConfigError, match="every node must run the same --nproc-per-node"):
        rendezvous.torchrun_process({**TORCHRUN_2x2, "WORLD_SIZE": "3"})


def _network_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.254", 9))  # a UDP connect sends nothing
        except OSError:
            pytest.skip("no network interface besides loopback")
        return s.getsockname()[0]


def test_gloo_is_bound_to_the_route_when_the_hostname_is_loopback(monkeypatch):
    address = _network_address()
    url = f"tcp://{address}:29500"
    monkeypatch.setattr(rendezvous, "hostname_addresses", lambda: ["127.0.1.1"])  # Debian's hosts
    env = {}
    name = rendezvous.bind_gloo_to_route(url, env)
    interfaces = [n for _, n in socket.if_nameindex()]
    assert env == {"GLOO_SOCKET_IFNAME": name} and name in interfaces and name != "lo"
    assert rendezvous._interface_of(address) == name
    # gloo's own choice stands: the variable given, or a hostname with a network address
    env = {"GLOO_SOCKET_IFNAME": "ib0"}
    assert rendezvous.bind_gloo_to_route(url, env) is None and env == {"GLOO_SOCKET_IFNAME": "ib0"}
    monkeypatch.setattr(rendezvous, "hostname_addresses", lambda: [address])
    env = {}
    assert rendezvous.bind_gloo_to_route(url, env) is None and env == {}
    # a rendezvous on loopback: every machine is this one, loopback is right
    monkeypatch.setattr(rendezvous, "hostname_addresses", lambda: ["127.0.1.1"])
    assert rendezvous.bind_gloo_to_route("tcp://127.0.0.1:29500", env) is None and env == {}


def test_no_interface_for_the_route_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(rendezvous, "hostname_addresses", lambda: ["127.0.1.1"])
    monkeypatch.setattr(rendezvous, "_route_source", lambda host, port: "10.9.8.7")
    monkeypatch.setattr(rendezvous, "_interface_of", lambda address: None)
    with pytest.raises(ConfigError, match="set GLOO_SOCKET_IFNAME to the network interface that "
                                          r"reaches 10\.0\.0\.1 \(address 10\.9\.8\.7\)"):
        rendezvous.bind_gloo_to_route("tcp://10.0.0.1:29500", {})
