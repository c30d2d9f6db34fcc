"""Where the processes of a multi-machine run meet, and which network interface gloo uses to reach
the other machines: what fastreid 1.4.0's launch path leaves to 127.0.0.1.

Two causes, both reproduced on this machine (the patch is ``multinode_rendezvous`` in compat.py):

* ``default_argument_parser()`` defaults ``--dist-url`` to ``tcp://127.0.0.1:<port>`` whatever
  ``--num-machines`` says, and ``launch()`` passes it on: a multi-machine run without ``--dist-url``
  has every machine wait at its own loopback address (``--dist-url auto`` is an AssertionError).
* gloo (the CPU backend, and the group fastreid's ``comm.all_gather``/``gather`` use next to NCCL)
  binds to the address this machine's hostname resolves to, and to 127.0.0.1 when it resolves to
  none. Where /etc/hosts maps the hostname to 127.0.0.1 or 127.0.1.1 (Debian/Ubuntu, containers,
  this machine), every process tells the others to reach it at 127.0.0.1:<random port>
  (fast-reid#629), even with a right ``--dist-url``. Only GLOO_SOCKET_IFNAME changes that.

Here: the URL comes from ``--dist-url``, else MASTER_ADDR/MASTER_PORT (SLURM recipes, torchrun),
and a multi-machine run without either is a ConfigError; gloo is bound to the interface that routes
to the rendezvous host when the hostname would give it a loopback address; a process started by
torchrun is one worker of torchrun's job (no second spawn).
"""
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import ConfigError

logger = logging.getLogger(__name__)

MASTER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")
GLOO_INTERFACE_VARIABLE = "GLOO_SOCKET_IFNAME"
URL_FORMS = "tcp://HOST:PORT of the machine with --machine-rank 0, env:// or file://PATH"
DIST_URL_HELP = (f"rendezvous: {URL_FORMS} (default: tcp://MASTER_ADDR:MASTER_PORT when set, "
                 "else a port of 127.0.0.1 on one machine)")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class TorchrunProcess:
    """This process's place in a torchrun job (the variables torchrun sets for its workers)."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int


def torchrun_process(env=os.environ):
    """The TorchrunProcess of a process torchrun started (TORCHELASTIC_RUN_ID set), else None."""
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE")
    try:
        values = [int(env[name]) for name in names]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"torchrun's variables {', '.join(names)} must all be integers: {e}") \
            from None
    job = TorchrunProcess(*values)
    if job.world_size != job.local_world_size * job.num_nodes:
        raise ConfigError(f"torchrun: WORLD_SIZE={job.world_size} is not LOCAL_WORLD_SIZE="
                          f"{job.local_world_size} x {job.num_nodes} nodes: every node must run "
                          "the same --nproc-per-node")
    return job


def world_size(num_gpus, num_machines, machine_rank, env=os.environ):
    """The number of training processes of a launch (torchrun's WORLD_SIZE under torchrun);
    ConfigError naming the flag that cannot be."""
    if num_gpus < 1 or num_machines < 1:
        raise ConfigError("--num-gpus and --num-machines must be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--machine-rank {machine_rank}: must be in 0..{num_machines - 1} "
                          f"(--num-machines {num_machines})")
    job = torchrun_process(env)
    if job is None:
        return num_gpus * num_machines
    if (num_gpus, num_machines) != (1, 1) and (num_gpus, num_machines) != (job.local_world_size,
                                                                          job.num_nodes):
        raise ConfigError(f"torchrun started {job.local_world_size} process(es) on each of "
                          f"{job.num_nodes} node(s): leave --num-gpus/--num-machines out "
                          f"(given: --num-gpus {num_gpus} --num-machines {num_machines})")
    return job.world_size


def check_launch(num_gpus, num_machines, machine_rank, dist_url, env=os.environ):
    """Every check of a launch's flags, before any work (a tool's input check): its world size."""
    size = world_size(num_gpus, num_machines, machine_rank, env)
    if size > 1 and torchrun_process(env) is None:
        resolve_dist_url(dist_url, num_machines, env)
    return size


def launches_rank0(machine_rank, env=os.environ):
    """Whether this launch runs global rank 0 (the process that writes a run's files)."""
    job = torchrun_process(env)
    return job.rank == 0 if job is not None else machine_rank == 0


def _addresses(host):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (socket.gaierror, UnicodeError):
        return []


def _is_loopback(address):
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def _master_url(env):
    if all(env.get(name) for name in MASTER_VARIABLES):
        return f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return None


def resolve_dist_url(dist_url, num_machines, env=os.environ):
    """The init_method of a launch: ``dist_url`` (--dist-url; None: not given), else
    tcp://MASTER_ADDR:MASTER_PORT; None where fastreid's single-machine default applies (one
    machine, neither given). ConfigError when the machines cannot meet there."""
    if dist_url is None:
        dist_url = _master_url(env)
        if dist_url is None:
            if num_machines == 1:
                return None
            raise ConfigError(f"--num-machines {num_machines} needs the address of the machine "
                              "with --machine-rank 0: --dist-url tcp://HOST:PORT (or MASTER_ADDR "
                              "and MASTER_PORT); fastreid's default tcp://127.0.0.1 reaches this "
                              "machine only")
    if dist_url == "auto":
        if num_machines > 1:
            raise ConfigError(f"--dist-url auto picks a free port of this machine: with "
                              f"--num-machines {num_machines} give {URL_FORMS}")
        return dist_url
    scheme = urlsplit(dist_url).scheme
    if scheme == "file":
        return dist_url
    if scheme == "env":
        missing = [name for name in MASTER_VARIABLES if not env.get(name)]
        if missing:
            raise ConfigError(f"--dist-url env:// reads {' and '.join(MASTER_VARIABLES)}; not set: "
                              f"{', '.join(missing)}")
        host = _tcp_host(_master_url(env))
    else:
        host = _tcp_host(dist_url)
    if not _addresses(host):
        raise ConfigError(f"--dist-url {dist_url}: host {host!r} does not resolve to an address")
    return dist_url


def _tcp_host(dist_url):
    """The host of a tcp://HOST:PORT URL; ConfigError for anything else."""
    parts = urlsplit(dist_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or not 0 < port < 65536:
        raise ConfigError(f"--dist-url {dist_url!r}: expected {URL_FORMS} (or auto on one machine)")
    return parts.hostname


def _rendezvous_host_port(dist_url, env):
    if dist_url.startswith("env://"):
        return env["MASTER_ADDR"], int(env["MASTER_PORT"])
    parts = urlsplit(dist_url)
    return parts.hostname, parts.port


def _route_source(host, port):
    """The local address this machine reaches ``host`` from (a UDP connect sends nothing)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(address)
            return s.getsockname()[0]
    except OSError as e:
        raise ConfigError(f"rendezvous host {host}: no route from this machine ({e})") from None


def _interface_of(address):
    """The name of the network interface that holds IPv4 ``address`` (Linux), else None."""
    try:
        import fcntl
    except ImportError:  # not a Unix
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address
                continue
        if socket.inet_ntoa(reply[20:24]) == address:
            return name
    return None


def hostname_addresses():
    """The addresses this machine's hostname resolves to (what gloo binds to by default)."""
    return _addresses(socket.gethostname())


def bind_gloo_to_route(dist_url, env=os.environ):
    """For a multi-machine launch: set GLOO_SOCKET_IFNAME in ``env`` (inherited by the processes the
    launch starts) to the interface that routes to the rendezvous host, when gloo would otherwise
    bind to a loopback address; returns the name set, None when gloo's own choice stands
    (GLOO_SOCKET_IFNAME given, a hostname with a non-loopback address, a rendezvous on this
    machine's loopback: the machines are all this one, file://)."""
    if dist_url.startswith("file://"):
        return None
    host, port = _rendezvous_host_port(dist_url, env)
    source = _route_source(host, port)
    if _is_loopback(source):
        logger.warning("rendezvous at %s, this machine's loopback address: the other machines must "
                       "be this one too", host)
        return None
    own = hostname_addresses()
    if env.get(GLOO_INTERFACE_VARIABLE) or (own and not all(_is_loopback(a) for a in own)):
        return None
    name = _interface_of(source)
    if name is None:
        raise ConfigError(f"this machine's hostname {socket.gethostname()!r} resolves to "
                          f"{', '.join(own) or 'no address'}: gloo would give the other machines "
                          f"a loopback address; set {GLOO_INTERFACE_VARIABLE} to the network "
                          f"interface that reaches {host} (address {source})")
    env[GLOO_INTERFACE_VARIABLE] = name
    logger.info("%s=%s (this machine's hostname resolves to %s; %s reaches %s)",
                GLOO_INTERFACE_VARIABLE, name, ", ".join(own) or "no address", name, host)
    return name
