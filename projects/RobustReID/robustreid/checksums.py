"""File checksums recorded beside results and generated data (which weights made them)."""
import hashlib


def sha256_of(path: str, block: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in ``block``-byte chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
