"""config.yaml -> frozen dataclasses. Every default and every environment override lives here.

Errors name the file, the key and what is allowed; the CLI prints them as one line and exits 2.
The JobSpec fragments (`defaults`, each inbox's `rules`) are validated by the schema in fields.py, the same
one that checks folder files and sidecars.

Longer than bgwatch's ~500-line modules on purpose: it is the one place where every setting's default, its
check and its environment override (the seed's names included) live side by side, so that none of them is
restated elsewhere (DESIGN.md, "Configuration"). Split it by section if a section grows its own logic.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from bgwatch.errors import ConfigError, SpecError

DEVICES = ("auto", "cuda", "cpu")
ON_SUCCESS = ("move", "delete", "keep")
LATE_SIDECARS = ("fail", "redo")
SCHEDULERS = ("", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm", "unipc")
VAE_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("none", "blocks", "unet")
HTTP_LIMITS = ("", "requests", "generations")
SEED_LISTEN = ("0.0.0.0", 8089)  # the original service's HOST and PORT defaults


@dataclass(frozen=True, slots=True)
class Limits:
    generations_per_minute: float = 10.0  # env BG_REQS_PER_MIN; token bucket for sdxl/runway
    jobs_per_minute: float = 0.0  # 0 = unlimited
    allow_4k: bool = False  # env ALLOW_4K=1; sdxl refuses inputs over 4096 px on a side otherwise
    max_pixels: int = 100_000_000  # larger inputs fail before their pixels are decoded (Pillow caps at ~179 MP)
    max_memory: int = 8 << 30  # bytes one job may use at most (estimated from its size before decoding)


@dataclass(frozen=True, slots=True)
class WatchSettings:
    settle_seconds: float = 2.0  # unchanged size+mtime this long before a file is taken
    rescan_seconds: float = 60.0  # safety-net full scan; events are only hints
    sidecar_seconds: float = 30.0  # how long a require_sidecar image waits for its sidecar
    orphan_sidecar_seconds: float = 3600.0  # a sidecar with no image is moved to failed/ after this
    lease_seconds: float = 300.0  # a host's claims/running rows older than this are taken back


@dataclass(frozen=True, slots=True)
class InboxConfig:
    path: Path
    outbox: Path
    poll: bool = False  # polling observer: network drives, where inotify misses other hosts' writes
    on_success: str = "move"  # move (to the inbox's done/) | delete | keep
    # A sidecar dropped after its image was processed: fail (to failed/, with a note: a delivered output is
    # never re-rendered by whoever writes a file later) | redo (the image is processed again with it).
    late_sidecars: str = "fail"
    rules: Mapping[str, Any] = field(default_factory=dict)  # a validated JobSpec fragment

    @property
    def name(self) -> str:
        return str(self.path)

    def rel_path(self, path: Path) -> str:
        """`path` relative to this inbox, with forward slashes: how runs, claims and sidecars name a file."""
        return PurePosixPath(*Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).parts).as_posix()


@dataclass(frozen=True, slots=True)
class SdxlSettings:
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False  # needs an accelerator; ignored (with a warning) on cpu
    scheduler: str = ""  # "" keeps the checkpoint's own scheduler
    fuse_qkv: bool = True  # fused attention projections in the UNet and the VAE (not with attention_slicing)
    channels_last: bool = True  # NHWC memory layout for the UNet's and the VAE's convolutions
    vae_dtype: str = "auto"  # the VAE decode's dtype; auto: no fp32 upcast on a GPU (bfloat16 for force_upcast VAEs)
    compile: str = "none"  # torch.compile: none | blocks (the UNet's transformer blocks) | unet; cached on disk


@dataclass(frozen=True, slots=True)
class RunwaySettings:
    base_url: str = "https://api.dev.runwayml.com"
    api_key: str = field(default="", repr=False)  # env RUNWAY_API_KEY; never logged
    api_key_file: Path | None = None
    request_timeout: float = 30.0  # seconds, each HTTP call
    task_deadline: float = 600.0  # seconds, the whole task from POST to download
    poll_interval: float = 2.0  # first poll delay; grows with backoff

    def key(self) -> str:
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(self.api_key_file, "runway.api_key_file", f"cannot read: {exc.strerror}") from None
        return ""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_bytes: int = 2 * 1024**3  # generated backgrounds beyond this are evicted, least recently used
    # None: state_dir/cache. A studio (store: postgresql://...) names a folder on the share every host reaches,
    # so one host's generation is every host's hit.
    dir: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: str = ""  # host:port for /metrics and /healthz (e.g. 127.0.0.1:9464); "" = off; `run --once` never serves
    stale_seconds: float = 120.0  # /healthz says 503 when the daemon made no progress for this long


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP API (the original service's endpoints) served by the daemon; off unless `listen` is set."""

    listen: str = ""  # host:port, e.g. 127.0.0.1:8089; "" = off. Beyond loopback an api_keys_file is required
    api_keys_file: Path | None = None  # one bearer token a line ('#' comments); keys are never logged
    max_upload_bytes: int = 50 * 1024**2  # a larger upload is refused with 413 while it streams in
    max_wait: float = 30.0  # seconds a request may wait for a generation token; longer: 429 with Retry-After
    keep_hours: float = 24.0  # results are downloadable this long, then removed
    window: int = 8  # HTTP jobs in the pipeline at once; the next requests wait in the queue
    queue: int = 64  # requests waiting for the window (their uploads on disk); beyond it: 503 with Retry-After
    # What the rate limit counts for HTTP requests: generations (replace with sdxl/runway takes a token of
    # limits.generations_per_minute) or requests (every /background/* request takes one, the original
    # service's meaning). "": requests when BG_REQS_PER_MIN is set, else generations.
    limit: str = ""
    cors: tuple[str, ...] = ()  # origins a browser page may call the API from; "*" = any (the original's)
    results_dir: Path | None = None  # None: state_dir/http/results; env OUTPUT_DIR sets it
    max_connections: int = 1000  # open connections at most (kept below the open-file limit); oldest idle go first
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    body_timeout: float = 30.0  # the longest pause while an upload's body arrives
    upload_timeout: float = 600.0  # seconds a whole upload may take

    @property
    def counts_requests(self) -> bool:
        """Whether every /background/* request takes a rate-limit token (the original service's meaning)."""
        return self.limit == "requests"

    def api_keys(self) -> frozenset[str]:
        """The keys in api_keys_file (none when unset). ConfigError when the file cannot be read."""
        if self.api_keys_file is None:
            return frozenset()
        try:
            text = self.api_keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise ConfigError(self.api_keys_file, "http.api_keys_file",
                              f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        lines = (line.strip() for line in text.splitlines())
        return frozenset(line for line in lines if line and not line.startswith("#"))


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_listen(where: Path | str, key: str, listen: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) -> (host, port); ConfigError naming `key` otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(where, key, f"{listen!r} is not host:port",
                          "e.g. 127.0.0.1:8089, [::1]:8089, or \"\" for off")
    return host.strip("[]"), int(port)


def _origins(where: Path | str, value: Any) -> tuple[str, ...]:
    """http.cors: "*", one origin, or a list of them (scheme://host[:port])."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(o, str) and o for o in items):
        raise ConfigError(where, "http.cors", f"must be \"*\" or a list of origins, got {value!r}",
                          '"*", or like ["https://shop.example.com"]')
    for origin in items:
        if origin != "*" and ("://" not in origin or origin.endswith("/")):
            raise ConfigError(where, "http.cors", f"{origin!r} is not an origin",
                              '"*", or scheme://host[:port] without a path, like "https://shop.example.com"')
    return tuple(items)


def check_metrics(where: Path | str, metrics: MetricsSettings, http: HttpSettings) -> None:
    """metrics.listen beyond loopback is served only with the API's keys (it tells what the daemon does)."""
    if not metrics.listen:
        return
    host, _port = split_listen(where, "metrics.listen", metrics.listen)
    if not is_loopback(host) and http.api_keys_file is None:
        raise ConfigError(where, "metrics.listen", f"{metrics.listen!r} is reachable from other machines, which "
                          "needs the API's keys: set http.api_keys_file (one bearer token a line)",
                          "a loopback address (127.0.0.1:9464), or an http.api_keys_file")


def check_http(where: Path | str, http: HttpSettings) -> None:
    """http.listen is host:port, and beyond loopback it comes with API keys."""
    if not http.listen:
        return
    listen_host, _port = split_listen(where, "http.listen", http.listen)
    if not is_loopback(listen_host) and http.api_keys_file is None:
        raise ConfigError(where, "http.listen", f"{http.listen!r} is reachable from other machines, which "
                          "needs API keys: set http.api_keys_file (one bearer token a line)",
                          "a loopback address (127.0.0.1:8089), or an api_keys_file")


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    window_per_worker: int = 4  # files claimed ahead per device worker; the rest stay in the inbox
    prepare_threads: int = 2
    mask_threads: int = 2  # model masks run at once on the CPU, sharing the cores; on CUDA: the device worker
    remote_threads: int = 2  # Runway tasks in flight at once (each polls for up to runway.task_deadline)
    finish_threads: int = 2
    stop_timeout: float = 120.0  # SIGTERM drains in-flight jobs this long at most; the rest wait for the next start
    stall_seconds: float = 900.0  # a worker busy with one job longer than this stops the systemd watchdog pings


@dataclass(frozen=True, slots=True)
class Config:
    source: Path | None = None  # the file it came from (None: built-in defaults)
    state_dir: Path = Path("state")
    device: str = "auto"  # env DEVICE
    debug: bool = False  # env DEBUG=1
    host: str = field(default_factory=socket.gethostname)
    models_dir: Path | None = None  # weights: <models_dir>/rembg (U2NET_HOME) and <models_dir>/huggingface (HF_HOME)
    allow_downloads: bool = False  # may an engine fetch missing weights at job time? (`models pull` always may)
    limits: Limits = field(default_factory=Limits)
    watch: WatchSettings = field(default_factory=WatchSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    sdxl: SdxlSettings = field(default_factory=SdxlSettings)
    runway: RunwaySettings = field(default_factory=RunwaySettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    allowed_models: tuple[str, ...] = ()  # models sidecars/folder files may name beyond the configured
    defaults: Mapping[str, Any] = field(default_factory=dict)  # JobSpec fragment for every inbox
    inboxes: tuple[InboxConfig, ...] = ()
    # "sqlite" (state_dir/bgwatch.db) or the studio's libpq URL, postgresql://...; env BGWATCH_STORE. Never in a
    # repr: it may carry a password (storebase.redact shows it).
    store: str = field(default="sqlite", repr=False)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "bgwatch.db"

    @property
    def cache_dir(self) -> Path:
        return self.cache.dir or self.state_dir / "cache"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def inbox_for(self, path: Path) -> InboxConfig | None:
        """The inbox that contains `path` (the innermost one if inboxes nest)."""
        path = path.resolve()
        best: InboxConfig | None = None
        for inbox in self.inboxes:
            root = inbox.path.resolve()
            if (path == root or root in path.parents) and (
                best is None or len(root.parts) > len(best.path.resolve().parts)
            ):
                best = inbox
        return best


# ---------------------------------------------------------------- parsing helpers


class _Reader:
    """Reads one mapping of config.yaml, remembering where it is, refusing keys it does not know."""

    def __init__(self, source: Path | str, prefix: str, data: Any) -> None:
        self.source = source
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, prefix or "(top level)", f"must be a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, default: Any) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def number(self, name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None,
               integer: bool = False) -> Any:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.source, self.key(name), f"must be a number, got {value!r}")
        if integer and not float(value).is_integer():
            raise ConfigError(self.source, self.key(name), f"must be a whole number, got {value!r}")
        if value < minimum:
            raise ConfigError(self.source, self.key(name), f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.source, self.key(name), f"must be <= {maximum:g}, got {value!r}")
        return int(value) if integer else float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.source, self.key(name), f"must be true or false, got {value!r}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.get(name, default)
        if value not in allowed:
            raise ConfigError(self.source, self.key(name), f"{value!r} is not allowed", ", ".join(allowed))
        return str(value)

    def text(self, name: str, default: str) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise ConfigError(self.source, self.key(name), f"must be a string, got {value!r}")
        return value

    def path(self, name: str, default: Path | None, base: Path) -> Path | None:
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(self.source, self.key(name), f"must be a path, got {value!r}")
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else base / p

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            import difflib

            name = unknown[0]
            close = difflib.get_close_matches(str(name), sorted(self.used), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                self.source, self.key(str(name)), f"unknown key{hint}", ", ".join(sorted(self.used))
            )


def _fragment(data: Any, source: Path | str, key: str) -> dict[str, Any]:
    from bgwatch import rules

    if data is None:
        return {}
    try:
        return rules.validate_fragment(data, f"{source}: {key}", trusted=True)
    except SpecError as exc:
        raise ConfigError(exc.source, exc.key, exc.problem, exc.allowed) from None


def parse_config(data: Any, source: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from a parsed YAML document; relative paths are relative to the file's folder."""
    env = os.environ if env is None else env
    where: Path | str = source if source is not None else "(built-in config)"
    base = source.parent.resolve() if source is not None else Path.cwd()
    top = _Reader(where, "", data)
    defaults = Config()

    lim = _Reader(where, "limits", top.get("limits", None))
    limits = Limits(
        generations_per_minute=lim.number("generations_per_minute", Limits().generations_per_minute),
        jobs_per_minute=lim.number("jobs_per_minute", Limits().jobs_per_minute),
        allow_4k=lim.flag("allow_4k", Limits().allow_4k),
        max_pixels=lim.number("max_pixels", Limits().max_pixels, minimum=1, maximum=178_956_970, integer=True),
        max_memory=lim.number("max_memory", Limits().max_memory, minimum=64 << 20, integer=True),
    )
    lim.finish()

    w = _Reader(where, "watch", top.get("watch", None))
    watch = WatchSettings(
        settle_seconds=w.number("settle_seconds", WatchSettings().settle_seconds),
        rescan_seconds=w.number("rescan_seconds", WatchSettings().rescan_seconds, minimum=0.1),
        sidecar_seconds=w.number("sidecar_seconds", WatchSettings().sidecar_seconds),
        orphan_sidecar_seconds=w.number("orphan_sidecar_seconds", WatchSettings().orphan_sidecar_seconds),
        lease_seconds=w.number("lease_seconds", WatchSettings().lease_seconds, minimum=1),
    )
    w.finish()

    p = _Reader(where, "pipeline", top.get("pipeline", None))
    pipeline = PipelineSettings(
        window_per_worker=p.number("window_per_worker", 4, minimum=1, integer=True),
        prepare_threads=p.number("prepare_threads", 2, minimum=1, integer=True),
        mask_threads=p.number("mask_threads", PipelineSettings().mask_threads, minimum=1, integer=True),
        remote_threads=p.number("remote_threads", PipelineSettings().remote_threads, minimum=1, integer=True),
        finish_threads=p.number("finish_threads", 2, minimum=1, integer=True),
        stop_timeout=p.number("stop_timeout", PipelineSettings().stop_timeout, minimum=0),
        stall_seconds=p.number("stall_seconds", PipelineSettings().stall_seconds, minimum=1),
    )
    p.finish()

    s = _Reader(where, "sdxl", top.get("sdxl", None))
    sdxl = SdxlSettings(
        attention_slicing=s.flag("attention_slicing", False),
        vae_slicing=s.flag("vae_slicing", False),
        vae_tiling=s.flag("vae_tiling", False),
        cpu_offload=s.flag("cpu_offload", False),
        scheduler=s.choice("scheduler", "", SCHEDULERS),
        fuse_qkv=s.flag("fuse_qkv", True),
        channels_last=s.flag("channels_last", True),
        vae_dtype=s.choice("vae_dtype", "auto", VAE_DTYPES),
        compile=s.choice("compile", "none", COMPILE_MODES),
    )
    s.finish()

    r = _Reader(where, "runway", top.get("runway", None))
    runway = RunwaySettings(
        base_url=r.text("base_url", RunwaySettings().base_url).rstrip("/"),
        api_key=r.text("api_key", ""),
        api_key_file=r.path("api_key_file", None, base),
        request_timeout=r.number("request_timeout", RunwaySettings().request_timeout, minimum=0.1),
        task_deadline=r.number("task_deadline", RunwaySettings().task_deadline, minimum=0.1),
        poll_interval=r.number("poll_interval", RunwaySettings().poll_interval, minimum=0.01),
    )
    r.finish()

    c = _Reader(where, "cache", top.get("cache", None))
    cache = CacheSettings(max_bytes=c.number("max_bytes", CacheSettings().max_bytes, integer=True),
                          dir=c.path("dir", None, base))
    c.finish()

    m = _Reader(where, "metrics", top.get("metrics", None))
    metrics = MetricsSettings(listen=m.text("listen", ""),
                              stale_seconds=m.number("stale_seconds", MetricsSettings().stale_seconds, minimum=1))
    m.finish()
    _host, sep, port = metrics.listen.rpartition(":")
    if metrics.listen and (not sep or not port.isdigit() or not 0 <= int(port) <= 65535):
        raise ConfigError(where, "metrics.listen", f"{metrics.listen!r} is not host:port",
                          "e.g. 127.0.0.1:9464, [::1]:9464, or \"\" for off")

    h = _Reader(where, "http", top.get("http", None))
    http = HttpSettings(
        listen=h.text("listen", ""),
        api_keys_file=h.path("api_keys_file", None, base),
        max_upload_bytes=h.number("max_upload_bytes", HttpSettings().max_upload_bytes, minimum=1, integer=True),
        max_wait=h.number("max_wait", HttpSettings().max_wait),
        keep_hours=h.number("keep_hours", HttpSettings().keep_hours),
        window=h.number("window", HttpSettings().window, minimum=1, integer=True),
        queue=h.number("queue", HttpSettings().queue, minimum=0, integer=True),
        limit=h.choice("limit", HttpSettings().limit, HTTP_LIMITS),
        cors=_origins(where, h.get("cors", [])),
        results_dir=h.path("results_dir", None, base),
        max_connections=h.number("max_connections", HttpSettings().max_connections, minimum=8, integer=True),
        header_timeout=h.number("header_timeout", HttpSettings().header_timeout, minimum=0.1),
        body_timeout=h.number("body_timeout", HttpSettings().body_timeout, minimum=0.1),
        upload_timeout=h.number("upload_timeout", HttpSettings().upload_timeout, minimum=0.1),
    )
    h.finish()
    check_http(where, http)
    check_metrics(where, metrics, http)

    allowed_models = top.get("allowed_models", [])
    if not isinstance(allowed_models, list) or not all(isinstance(m, str) for m in allowed_models):
        raise ConfigError(where, "allowed_models", "must be a list of model names or folders")

    default_fragment = _fragment(top.get("defaults", None), where, "defaults")

    raw_inboxes = top.get("inboxes", [])
    if not isinstance(raw_inboxes, list):
        raise ConfigError(where, "inboxes", "must be a list of inboxes")
    inboxes = []
    for i, raw in enumerate(raw_inboxes):
        ib = _Reader(where, f"inboxes[{i}]", raw)
        path = ib.path("path", None, base)
        if path is None:
            raise ConfigError(where, ib.key("path"), "every inbox needs a path")
        outbox = ib.path("outbox", None, base)
        if outbox is None:
            raise ConfigError(where, ib.key("outbox"), "every inbox needs an outbox")
        inboxes.append(
            InboxConfig(
                path=path,
                outbox=outbox,
                poll=ib.flag("poll", False),
                on_success=ib.choice("on_success", "move", ON_SUCCESS),
                late_sidecars=ib.choice("late_sidecars", "fail", LATE_SIDECARS),
                rules=_fragment(ib.get("rules", None), where, f"inboxes[{i}].rules"),
            )
        )
        ib.finish()

    config = Config(
        source=source,
        state_dir=top.path("state_dir", Path("state"), base) or base / "state",
        device=top.choice("device", "auto", DEVICES),
        debug=top.flag("debug", False),
        host=top.text("host", defaults.host) or defaults.host,
        models_dir=top.path("models_dir", None, base),
        allow_downloads=top.flag("allow_downloads", False),
        limits=limits,
        watch=watch,
        pipeline=pipeline,
        sdxl=sdxl,
        runway=runway,
        cache=cache,
        metrics=metrics,
        http=http,
        allowed_models=tuple(allowed_models),
        defaults=default_fragment,
        inboxes=tuple(inboxes),
        store=store_setting(where, "store", top.text("store", "sqlite")),
    )
    top.finish()
    if not config.host or config.host.startswith(".") or any(c in config.host for c in "/\\\0"):
        raise ConfigError(where, "host", f"{config.host!r} cannot name a claim folder",
                          "a name without '/', '\\' or a leading '.'")
    _check_inboxes(config, where)
    config = apply_env(config, env)
    if env.get("OUTPUT_DIR"):
        _check_inboxes(config, f"environment OUTPUT_DIR={env['OUTPUT_DIR']}")
    return config


def _check_inboxes(config: Config, where: Path | str) -> None:
    seen: dict[Path, int] = {}
    for i, inbox in enumerate(config.inboxes):
        root = inbox.path.resolve()
        if root in seen:
            raise ConfigError(where, f"inboxes[{i}].path", f"{inbox.path} is already inboxes[{seen[root]}]")
        seen[root] = i
    for i, inbox in enumerate(config.inboxes):
        out = inbox.outbox.resolve()
        for j, other in enumerate(config.inboxes):
            root = other.path.resolve()
            if out == root or root in out.parents:
                whose = "its inbox" if i == j else f"inboxes[{j}] ({other.path})"
                raise ConfigError(
                    where, f"inboxes[{i}].outbox", f"must not be inside {whose} (outputs would be taken as inputs)"
                )


def store_setting(where: Path | str, key: str, value: str) -> str:
    """`store:` is sqlite or a libpq URL; the error shows the URL without its password."""
    from bgwatch.storebase import SQLITE, is_postgres, redact

    value = value.strip()
    if value == SQLITE or is_postgres(value):
        return value
    raise ConfigError(where, key, f"{redact(value)!r} is not a store",
                      "sqlite (one workstation), or a PostgreSQL URL: postgresql://user@host/dbname")


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment {name}", name, f"{value!r} is not a flag", "1, 0, true, false")


def apply_env(config: Config, env: Mapping[str, str]) -> Config:
    """The original service's environment variables, applied over the file."""
    limits = config.limits
    if env.get("BG_REQS_PER_MIN"):
        try:
            rate = float(env["BG_REQS_PER_MIN"])
        except ValueError:
            raise ConfigError("environment BG_REQS_PER_MIN", "BG_REQS_PER_MIN",
                              f"{env['BG_REQS_PER_MIN']!r} is not a number") from None
        if rate < 0:
            raise ConfigError("environment BG_REQS_PER_MIN", "BG_REQS_PER_MIN", "must be >= 0")
        limits = replace(limits, generations_per_minute=rate)
    allow = _env_flag(env, "ALLOW_4K")
    if allow is not None:
        limits = replace(limits, allow_4k=allow)

    device = config.device
    if env.get("DEVICE"):
        if env["DEVICE"] not in DEVICES:
            raise ConfigError("environment DEVICE", "DEVICE", f"{env['DEVICE']!r} is not allowed", ", ".join(DEVICES))
        device = env["DEVICE"]

    defaults = dict(config.defaults)
    env_fragment: dict[str, Any] = {}
    if env.get("BG_ENGINE"):
        env_fragment["engine"] = env["BG_ENGINE"]
    if env.get("MODEL_ID"):
        env_fragment["model"] = env["MODEL_ID"]
    if _env_flag(env, "BG_FALLBACK_LOCAL") and "fallback_engine" not in defaults:
        env_fragment["fallback_engine"] = "sdxl"  # the original's: a failed Runway generation is made locally
    if env_fragment:
        defaults.update(_fragment(env_fragment, "environment", "BG_ENGINE/MODEL_ID/BG_FALLBACK_LOCAL"))

    inboxes = config.inboxes
    http = config.http
    if env.get("OUTPUT_DIR"):
        root = Path(env["OUTPUT_DIR"]).expanduser()
        inboxes = tuple(replace(ib, outbox=root / ib.path.name) for ib in inboxes)
        # The original service wrote its results into OUTPUT_DIR and answered their paths: so does the door.
        http = replace(http, results_dir=Path(os.path.abspath(root)))
    if not http.limit:
        http = replace(http, limit="requests" if env.get("BG_REQS_PER_MIN") else "generations")
    http = _env_listen(http, env)

    runway = config.runway
    if env.get("RUNWAY_API_KEY"):
        runway = replace(runway, api_key=env["RUNWAY_API_KEY"])
    if env.get("RUNWAY_TIMEOUT_MS"):
        text = env["RUNWAY_TIMEOUT_MS"]
        if not text.isdigit() or int(text) < 100:
            raise ConfigError("environment RUNWAY_TIMEOUT_MS", "RUNWAY_TIMEOUT_MS",
                              f"{text!r} is not a time in milliseconds", "a whole number >= 100, like 180000")
        runway = replace(runway, task_deadline=int(text) / 1000)

    store = config.store
    if env.get("BGWATCH_STORE"):
        store = store_setting("environment BGWATCH_STORE", "BGWATCH_STORE", env["BGWATCH_STORE"])

    debug = _env_flag(env, "DEBUG")
    return replace(
        config,
        store=store,
        limits=limits,
        device=device,
        defaults=defaults,
        inboxes=inboxes,
        runway=runway,
        http=http,
        debug=config.debug if debug is None else debug,
    )


def _env_listen(http: HttpSettings, env: Mapping[str, str]) -> HttpSettings:
    """The original service's HOST and PORT: either one turns the HTTP API on. What is not given comes from
    http.listen, else the original's 0.0.0.0:8089; 0.0.0.0 only with API keys (else 127.0.0.1: the API is
    never open to the network without keys unless HOST says so, and then check_http asks for them)."""
    host_env, port_env = env.get("HOST", "").strip(), env.get("PORT", "").strip()
    if not host_env and not port_env:
        return http
    if port_env and (not port_env.isdigit() or not 0 <= int(port_env) <= 65535):
        raise ConfigError("environment PORT", "PORT", f"{port_env!r} is not a port", "0 to 65535, like 8089")
    host, port = SEED_LISTEN[0] if http.api_keys_file is not None else "127.0.0.1", SEED_LISTEN[1]
    if http.listen:
        host, port = split_listen("http.listen", "http.listen", http.listen)
    host = host_env.strip("[]") or host
    port = int(port_env) if port_env else port
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    check_http(f"environment HOST/PORT ({listen})", replace(http, listen=listen))
    return replace(http, listen=listen)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read config.yaml (or the embedded sample when path is None)."""
    from bgwatch.yamlsafe import load_yaml_file

    if path is None:
        return parse_config({}, None, env)
    if not path.exists():
        raise ConfigError(path, "", "no such file (pass -c CONFIG, or run from the folder holding config.yaml)")
    try:
        data = load_yaml_file(path, max_bytes=1024 * 1024)
    except SpecError as exc:
        raise ConfigError(exc.source, exc.key, exc.problem, exc.allowed) from None
    return parse_config(data, path, env)
