"""The tiktoken encodings, loaded offline from the package, and which one counts a model.

* **No network access, ever.** tiktoken normally downloads its BPE rank files on first
  use and caches them under ``/tmp`` (or ``TIKTOKEN_CACHE_DIR``). Here the ranks are
  read from gzip files shipped inside the package (``tokenguard/encodings/``), checked
  against the SHA-256 that tiktoken itself expects for the *uncompressed* file, and
  turned into a :class:`tiktoken.Encoding` directly. tiktoken's download and cache code
  is never called, so nothing is fetched and no cache file is read or written.
* **Corrupt or mismatched data fails loudly.** If a packaged file is missing, is not
  valid gzip, does not hash to tiktoken's expected value, or cannot be parsed,
  :class:`EncodingDataError` is raised (on first use of that encoding) instead of
  counting with a wrong vocabulary.

Model -> encoding: tiktoken's own model table (``tiktoken.model.encoding_name_for_model``)
decides. Only ``cl100k_base`` and ``o200k_base`` are shipped. ``o200k_harmony`` (gpt-oss)
has the same ranks as ``o200k_base`` and differs only in special tokens, which user text
never produces here, so it is counted exactly with ``o200k_base``. Every other case -- a
model tiktoken does not know (proxied/local models, new names) or one that maps to a
legacy encoding we do not ship (``r50k_base``, ``p50k_base``, ``p50k_edit``, ``gpt2``:
davinci-era completion models) -- falls back to ``o200k_base``, the encoding of all
current OpenAI chat models. For the legacy models that makes counts approximate.

Loading an encoding takes a fraction of a second (o200k_base is the larger one) and
blocks; it happens once per process per encoding. Call :func:`preload` at start-up
(e.g. via ``trio.to_thread.run_sync``) to keep that off the request path.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import gc
import gzip
import hashlib
import threading
from importlib import resources

import tiktoken
import tiktoken.load
import tiktoken.model
import tiktoken_ext.openai_public as _openai_public

SHIPPED_ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base")
FALLBACK_ENCODING = "o200k_base"

# Encodings whose mergeable ranks (the only thing used for counting user text) are
# byte-for-byte those of a shipped encoding.
_SAME_RANKS_AS: dict[str, str] = {"o200k_harmony": "o200k_base"}


class EncodingDataError(RuntimeError):
    """Packaged BPE data is missing, corrupt, unparsable or not what tiktoken expects.

    Reinstalling tokenguard (with the tiktoken release it was built for) fixes it.
    """


def _read_packaged(name: str) -> bytes:
    """Return the uncompressed ``<name>.tiktoken`` shipped in ``tokenguard/encodings``."""
    filename = f"{name}.tiktoken.gz"
    resource = resources.files("tokenguard") / "encodings" / filename
    try:
        compressed = resource.read_bytes()
    except OSError as exc:
        raise EncodingDataError(
            f"packaged encoding file tokenguard/encodings/{filename} cannot be read: {exc}"
        ) from exc
    try:
        return gzip.decompress(compressed)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise EncodingDataError(
            f"packaged encoding file tokenguard/encodings/{filename} is not valid gzip: {exc}"
        ) from exc


def _parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse the ``.tiktoken`` format: one ``<base64 token> <rank>`` per line.

    Same format and result as ``tiktoken.load.load_tiktoken_bpe``.
    """
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:  # also binascii.Error and a wrong field count
            raise EncodingDataError(f"malformed line {line[:80]!r} in {source}") from exc
    return ranks


def _load_ranks(name: str, expected_hash: str) -> dict[bytes, int]:
    """Load the packaged ranks of encoding ``name``, verified against ``expected_hash``.

    ``expected_hash`` is the hex SHA-256 of the uncompressed ``.tiktoken`` file, as
    tiktoken's own constructors pass it. Raises :class:`EncodingDataError` on mismatch.
    """
    data = _read_packaged(name)
    if not tiktoken.load.check_hash(data, expected_hash):
        actual = hashlib.sha256(data).hexdigest()
        raise EncodingDataError(
            f"SHA-256 mismatch for packaged encoding {name!r}: tiktoken "
            f"{tiktoken.__version__} expects {expected_hash}, the file in "
            f"tokenguard/encodings hashes to {actual}. The package data is corrupt or "
            f"does not belong to this tiktoken release; reinstall tokenguard."
        )
    return _parse_ranks(data, f"tokenguard/encodings/{name}.tiktoken.gz")


def _offline_load_tiktoken_bpe(
    tiktoken_bpe_file: str, expected_hash: str | None = None
) -> dict[bytes, int]:
    """Stand-in for ``tiktoken.load.load_tiktoken_bpe`` that only reads package data.

    tiktoken's constructors pass a download URL; its basename names the file we ship.
    Anything we do not ship is refused rather than downloaded.
    """
    basename = tiktoken_bpe_file.rstrip("/").rsplit("/", 1)[-1]
    name = basename.removesuffix(".tiktoken")
    if name == basename or name not in SHIPPED_ENCODINGS:
        raise EncodingDataError(
            f"{tiktoken_bpe_file} is not shipped with tokenguard (shipped: "
            f"{', '.join(SHIPPED_ENCODINGS)}); refusing to download it"
        )
    if expected_hash is None:
        # We only trust data verified against tiktoken's own hash.
        raise EncodingDataError(f"tiktoken gave no expected hash for {tiktoken_bpe_file}")
    return _load_ranks(name, expected_hash)


# Guards the temporary swap of tiktoken_ext.openai_public.load_tiktoken_bpe (a module
# global shared with every thread) and makes each encoding load exactly once.
_LOAD_LOCK = threading.Lock()
_ENCODINGS: dict[str, tiktoken.Encoding] = {}


def _build_encoding(name: str) -> tiktoken.Encoding:
    """Build encoding ``name`` from package data, uncached.

    Reuses tiktoken's own constructor so that pat_str, special tokens and the expected
    hash come from tiktoken and cannot drift from it; only its file loader is swapped.
    Caller must hold ``_LOAD_LOCK``.
    """
    if name not in SHIPPED_ENCODINGS:
        raise EncodingDataError(f"encoding {name!r} is not shipped with tokenguard")
    constructor = _openai_public.ENCODING_CONSTRUCTORS[name]
    original = _openai_public.load_tiktoken_bpe
    _openai_public.load_tiktoken_bpe = _offline_load_tiktoken_bpe
    try:
        kwargs = constructor()
    finally:
        _openai_public.load_tiktoken_bpe = original
    encoding = tiktoken.Encoding(**kwargs)
    # The Rust core keeps its own copy of the ranks; tiktoken keeps the Python dict only
    # to pickle the encoding, which we never do. Dropping it saves ~28 MB per node (o200k).
    encoding._mergeable_ranks = {}
    del kwargs
    _return_freed_memory()
    return encoding


def _return_freed_memory() -> None:
    """Hand the parse's freed heap back to the OS (glibc keeps it otherwise), so a node's
    resident memory reflects what it uses. A no-op where glibc is not the allocator."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def get_encoding(name: str) -> tiktoken.Encoding:
    encoding = _ENCODINGS.get(name)
    if encoding is not None:
        return encoding
    with _LOAD_LOCK:
        # Another thread may have finished loading while we waited.
        encoding = _ENCODINGS.get(name)
        if encoding is None:
            encoding = _build_encoding(name)
            _ENCODINGS[name] = encoding
        return encoding


def preload(encodings: tuple[str, ...] = SHIPPED_ENCODINGS) -> None:
    """Load (and verify) ``encodings`` now, so the first request does not pay for it.

    Raises :class:`EncodingDataError` if the package data is bad.
    """
    for name in encodings:
        get_encoding(name)


def encoding_name_for(model: str) -> str:
    """Return the name of the shipped encoding used to count tokens for ``model``.

    Always one of :data:`SHIPPED_ENCODINGS`; never raises. See the module docstring for
    the fallback rules.
    """
    if not isinstance(model, str):
        return FALLBACK_ENCODING
    return _encoding_name_of(model)


@functools.lru_cache(maxsize=1024)
def _encoding_name_of(model: str) -> str:
    # Cached: a model tiktoken does not know is matched against all its prefixes, on
    # every request for it (microseconds each time); clients name few models.
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING
    name = _SAME_RANKS_AS.get(name, name)
    return name if name in SHIPPED_ENCODINGS else FALLBACK_ENCODING


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """Return the (cached) tiktoken encoding used to count tokens for ``model``.

    Unknown models and models mapping to an encoding that is not shipped get
    ``o200k_base``. Never touches the network. Raises :class:`EncodingDataError` only if
    the packaged data is missing or corrupt.
    """
    return get_encoding(encoding_name_for(model))
