"""`bgwatch init`: a starting config.yaml for a workstation, with absolute paths a service can use.

The sample config.yaml in the source tree uses paths relative to itself (for `make demo`); a service reads
/etc/bgwatch/config.yaml, where a relative state_dir would land under /etc (read-only to the service).
It names models_dir (under the state folder): `sudo bgwatch models pull` and `sudo bgwatch doctor` then use
the weights the service uses, not root's home.
"""

from __future__ import annotations

import os
from pathlib import Path

from bgwatch.errors import ConfigError

TEMPLATE = """\
# bgwatch configuration, written by `bgwatch init`. Check it with `bgwatch doctor -c {config}`.
# Every setting is shown with its default; the sample config.yaml in the source documents each one.
# Environment overrides: DEVICE, BG_ENGINE, MODEL_ID, OUTPUT_DIR, RUNWAY_API_KEY, BG_REQS_PER_MIN, ALLOW_4K, DEBUG
state_dir: {state_dir}   # local disk only (SQLite, background cache, logs); the unit's StateDirectory
models_dir: {models_dir}   # weights: <models_dir>/rembg and <models_dir>/huggingface, for every user who runs bgwatch
device: auto                    # auto | cuda | cpu: cuda refuses to start without a working GPU
debug: false

limits:
  generations_per_minute: 10
  jobs_per_minute: 0
  allow_4k: false
  max_pixels: 100_000_000

watch:
  settle_seconds: 2.0
  rescan_seconds: 60
  sidecar_seconds: 30
  orphan_sidecar_seconds: 3600
  lease_seconds: 300

pipeline:
  window_per_worker: 4
  prepare_threads: 2
  mask_threads: 2
  remote_threads: 2
  finish_threads: 2
  stop_timeout: 120
  stall_seconds: 900

sdxl:
  attention_slicing: false
  vae_slicing: false
  vae_tiling: false
  cpu_offload: false
  scheduler: ""
  fuse_qkv: true
  channels_last: true
  vae_dtype: auto                 # auto | float32 | bfloat16 | float16
  compile: none                   # none | blocks | unet (compiled kernels cached under state_dir/torch-compile)

runway:
  base_url: https://api.dev.runwayml.com
  # api_key_file: /etc/bgwatch/runway.key   # or RUNWAY_API_KEY in /etc/bgwatch/secrets.env
  request_timeout: 30
  task_deadline: 600
  poll_interval: 2.0

cache:
  max_bytes: 2147483648

metrics:
  listen: 127.0.0.1:9464        # /metrics for Prometheus, /healthz for monitoring; local only
  stale_seconds: 120

allowed_models: []

defaults:
  mask: {{engine: auto, model: u2net}}

# bgwatch never creates an inbox: create these folders (or mount the share) and give the service user
# write access. Inboxes on a network share need `poll: true`. Outboxes are created when missing.
inboxes:
  - path: {inbox_root}/cleanup
    outbox: {outbox_root}/cleanup
    poll: false
    on_success: move
    rules: {{operation: cleanup, mode: transparent}}
  - path: {inbox_root}/white
    outbox: {outbox_root}/white
    rules: {{operation: cleanup, mode: color, background_color: "#ffffff", output: {{format: jpg, quality: 92}}}}
  - path: {inbox_root}/replace
    outbox: {outbox_root}/replace
    rules: {{operation: replace, engine: sdxl, prompt: "modern minimalist studio with soft lighting", seed: 42}}
"""


def render(config: Path, state_dir: Path, inbox_root: Path, outbox_root: Path | None = None) -> str:
    state_dir, inbox_root = Path(os.path.abspath(state_dir)), Path(os.path.abspath(inbox_root))
    outbox_root = Path(os.path.abspath(outbox_root)) if outbox_root else inbox_root.parent / "outbox"
    if outbox_root == inbox_root or inbox_root in outbox_root.parents:
        raise ConfigError("--outbox-root", str(outbox_root), "must not be inside the inbox root")
    return TEMPLATE.format(config=Path(os.path.abspath(config)), state_dir=state_dir, models_dir=state_dir / "models",
                           inbox_root=inbox_root, outbox_root=outbox_root)


def write_config(target: Path, *, state_dir: Path, inbox_root: Path, outbox_root: Path | None = None,
                 force: bool = False) -> None:
    """Write the config (0644: it holds no secret) and check it parses; never overwrite without force."""
    import yaml

    from bgwatch.config import parse_config

    text = render(target, state_dir, inbox_root, outbox_root)
    parse_config(yaml.safe_load(text), Path(os.path.abspath(target)), env={})  # our own template: trusted
    if target.exists() and not force:
        raise ConfigError(target, "", "already exists (pass --force to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
