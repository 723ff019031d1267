"""The original service's clients against bgwatch's door: its Python client as its code is (requests, the
`success` check, `output_path` read back), its health check, root, CORS for a browser page, its
environment variables, the soften knobs it sends, and Runway falling back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from PIL import Image

from bgwatch import rules
from bgwatch.config import parse_config
from bgwatch.errors import ConfigError, SpecError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline import cleanup
from tests.apihelpers import ApiDaemon, api_config, pixels, post, rows, sample_bytes
from tests.helpers import wait_for
from tests.runway_server import FakeRunway


class OriginalClient:
    """The original service's Python client, as its code is: requests.post with files and data, a 200 whose
    JSON says `success`, then `output_path`."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def _make_request(self, endpoint: str, files: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.base_url}{endpoint}", files=files, data=data, timeout=60)
        if response.status_code == 200:
            result: dict[str, Any] = response.json()
            if result.get("success"):
                return result
            raise AssertionError(f"PROCESSING_FAILED: {result.get('error', 'Unknown error')}")
        raise AssertionError(f"HTTP {response.status_code}: {response.text}")

    def cleanup(self, image_path: Path, mode: str = "transparent", blur_radius: int | None = None,
                desaturate_pct: int | None = None, enhance_fg: bool = True, denoise: bool = False) -> str:
        with open(image_path, "rb") as f:
            data: dict[str, Any] = {"mode": mode, "enhance_fg": enhance_fg, "denoise": denoise}
            if blur_radius is not None:
                data["blur_radius"] = blur_radius
            if desaturate_pct is not None:
                data["desaturate_pct"] = desaturate_pct
            result = self._make_request("/background/cleanup", {"file": (image_path.name, f, "image/jpeg")}, data)
        return str(result.get("output_path"))

    def replace(self, image_path: Path, prompt: str, negative_prompt: str = "people, text, watermark",
                steps: int = 20, guidance_scale: float = 7.5, seed: int | None = None) -> str:
        with open(image_path, "rb") as f:
            data: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                                    "guidance_scale": guidance_scale, "enhance_fg": True, "match_colors": True,
                                    "feather_edges": True}
            if seed is not None:
                data["seed"] = seed
            result = self._make_request("/background/replace", {"file": (image_path.name, f, "image/jpeg")}, data)
        return str(result.get("output_path"))

    def get_status(self) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/health", timeout=5)
        response.raise_for_status()
        status: dict[str, Any] = response.json()
        return status


def test_the_original_python_client_gets_success_and_a_readable_output_path(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    config = parse_config({"state_dir": "state", "host": "testhost", "http": {"listen": "127.0.0.1:0"},
                           "defaults": {"mask": {"engine": "classical"}, "engine": "gradient"}},
                          tmp_path / "config.yaml", env={"OUTPUT_DIR": str(out)})
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_bytes(tmp_path, 21))
    with ApiDaemon(config) as api:
        client = OriginalClient(str(api.client.base_url).rstrip("/"))
        health = client.get_status()
        assert (health["status"], health["engine"]) == ("healthy", "GRADIENT")
        assert health["device"] in ("cpu", "cuda") and health["configured_device"] == "auto"

        cleaned = Path(client.cleanup(photo, mode="soften", blur_radius=12, desaturate_pct=60))
        assert cleaned.parent == out.resolve(), "OUTPUT_DIR holds the HTTP results, as the original's"
        with Image.open(cleaned) as img:
            assert img.size == (256, 192) and img.mode == "RGB"
        replaced = Path(client.replace(photo, prompt="studio backdrop", seed=3))
        assert replaced.parent == out.resolve() and replaced.stat().st_size > 0
        assert api.client.get(f"/download/{replaced.name}").content == replaced.read_bytes()

        info = api.client.get("/").json()
        assert "/background/cleanup" in info["endpoints"] and info["status"] == "running"
        missing = api.client.get("/nothing-here")
        assert missing.status_code == 404 and missing.json()["success"] is False
        bad_id = api.client.get("/runs/abc")
        assert bad_id.status_code == 422 and bad_id.json()["detail"].startswith("request: run_id")
        refused = post(api.client, "cleanup", b"not an image", name="notes.jpg")
        assert refused.status_code == 422 and refused.json()["success"] is False
    specs = [JobSpec.from_dict(json.loads(r["spec_json"])) for r in rows(config, "http")]
    assert (specs[0].mode, specs[0].blur_radius, specs[0].desaturate_pct) == ("soften", 12, 60)


def test_a_browser_page_on_another_origin_may_call_it_when_cors_is_on(tmp_path: Path) -> None:
    origin = "https://shop.example.com"
    for side in ("on", "off"):
        (tmp_path / side).mkdir()
    with ApiDaemon(api_config(tmp_path / "on", http={"cors": "*"})) as api:
        preflight = api.client.options("/background/cleanup", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        answer = post(api.client, "cleanup", sample_bytes(tmp_path, 23), headers={"Origin": origin})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    with ApiDaemon(api_config(tmp_path / "off")) as api:
        assert "access-control-allow-origin" not in api.client.get("/health", headers={"Origin": origin}).headers
    with pytest.raises(ConfigError, match=r"http\.cors.*not an origin"):
        parse_config({"http": {"listen": "127.0.0.1:0", "cors": ["shop.example.com"]}}, env={})


def test_the_seed_environment_variables(tmp_path: Path) -> None:
    assert parse_config({}, env={"PORT": "8090"}).http.listen == "127.0.0.1:8090", "no keys: loopback"
    keys = tmp_path / "keys"
    keys.write_text("k-0123456789\n")
    keyed = {"http": {"api_keys_file": str(keys)}}
    assert parse_config(keyed, env={"PORT": "8090"}).http.listen == "0.0.0.0:8090", "the original's host"
    assert parse_config(keyed, env={"HOST": "::1"}).http.listen == "[::1]:8089", "the original's port"
    assert parse_config({"http": {"listen": "127.0.0.1:9000"}}, env={"PORT": "9001"}).http.listen == "127.0.0.1:9001"
    with pytest.raises(ConfigError, match="api_keys_file"):
        parse_config({}, env={"HOST": "0.0.0.0", "PORT": "8090"})
    with pytest.raises(ConfigError, match="PORT"):
        parse_config({}, env={"PORT": "eighty"})

    seed = parse_config({}, env={"BG_REQS_PER_MIN": "5", "RUNWAY_TIMEOUT_MS": "180000", "BG_FALLBACK_LOCAL": "1"})
    assert (seed.http.limit, seed.limits.generations_per_minute) == ("requests", 5.0)
    assert seed.runway.task_deadline == 180.0 and seed.defaults["fallback_engine"] == "sdxl"
    plain = parse_config({}, env={})
    assert plain.http.limit == "generations" and "fallback_engine" not in plain.defaults
    assert parse_config({"http": {"limit": "generations"}}, env={"BG_REQS_PER_MIN": "5"}).http.limit == "generations"
    with pytest.raises(ConfigError, match="RUNWAY_TIMEOUT_MS"):
        parse_config({}, env={"RUNWAY_TIMEOUT_MS": "3 minutes"})


@pytest.mark.slow
def test_port_makes_bgwatch_serve_listen_there(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "config.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    env = {**os.environ, "PORT": str(port)}
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "-c", str(tmp_path / "config.yaml"), "serve"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        def healthy() -> Any:
            assert daemon.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                return None

        assert wait_for(healthy, timeout=60)["status"] == "healthy"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


# ---------------------------------------------------------------- soften: blur_radius and desaturate_pct


def _striped(h: int = 120, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A loud checkerboard backdrop with a yellow box on it, and the box's mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    squares = ((yy // 8) + (xx // 8)) % 2 == 1
    rgb = np.stack([np.where(squares, 230, 40), (xx * 255 // w), np.where(squares, 40, 210)], -1).astype(np.uint8)
    alpha = np.zeros((h, w), np.uint8)
    alpha[35:85, 55:105] = 255
    rgb[35:85, 55:105] = (250, 200, 30)
    return rgb, alpha


def test_soften_blur_radius_and_desaturate_pct_change_the_background_only() -> None:
    rgb, alpha = _striped()
    background = alpha == 0

    def soften(**knobs: int) -> np.ndarray:
        return cleanup.cleanup(rgb, alpha, JobSpec(mode="soften", **knobs)).astype(np.float32)

    def detail(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img, axis=1))[background[:, 1:]].mean())

    def colour(img: np.ndarray) -> float:
        return float(img.std(axis=2)[background].mean())

    sharp, soft = soften(blur_radius=1, desaturate_pct=0), soften(blur_radius=20, desaturate_pct=0)
    assert detail(sharp) > 3 * detail(soft), "a larger radius blurs the backdrop more"
    grey, vivid = soften(blur_radius=4, desaturate_pct=100), soften(blur_radius=4, desaturate_pct=0)
    assert colour(grey) < 1.0 < 0.5 * colour(vivid), "desaturate_pct 100 leaves the backdrop grey"
    assert np.array_equal(soften(blur_radius=1)[~background], soften(blur_radius=20)[~background]), "subject kept"


def test_soften_knobs_are_checked_in_sidecars_and_requests(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"blur_radius: 500 is out of range \(allowed: 0 to 200\)"):
        rules.validate_fragment({"blur_radius": 500}, "photo.yaml", trusted=False)
    with pytest.raises(SpecError, match="desaturate_pct"):
        rules.validate_fragment({"desaturate_pct": -1}, "photo.yaml", trusted=False)
    config = api_config(tmp_path, {"shop": {"rules": {"operation": "cleanup", "mode": "soften"}}})
    inbox = config.inboxes[0]
    (inbox.path / "photo.jpg").write_bytes(b"")
    (inbox.path / "photo.yaml").write_text("blur_radius: 6\ndesaturate_pct: 80\n")
    spec = rules.resolve(inbox.path / "photo.jpg", inbox, config).spec
    assert (spec.blur_radius, spec.desaturate_pct) == (6, 80)
    with ApiDaemon(config) as api:
        answer = post(api.client, "cleanup", sample_bytes(tmp_path, 25), mode="soften", blur_radius=999)
        assert answer.status_code == 422
        assert answer.json()["detail"] == "request: blur_radius: 999 is out of range (allowed: 0 to 200)"


# ---------------------------------------------------------------- a generation that fails falls back


def test_a_failed_runway_generation_falls_back_and_the_run_says_which_engine_made_it(tmp_path: Path) -> None:
    with FakeRunway(statuses=["PENDING", "FAILED"]) as runway:
        config = api_config(tmp_path, runway={"base_url": runway.url, "api_key": "k-test-runway",
                                              "poll_interval": 0.01}, limits={"generations_per_minute": 0})
        image = sample_bytes(tmp_path, 27)
        with ApiDaemon(config) as api:
            answer = post(api.client, "replace", image, engine="runway", prompt="oak table", seed=5,
                          fallback_engine="gradient")
            assert answer.status_code == 200, answer.text
            assert answer.json()["bg_engine"] == "gradient", "the fallback made the background"
            plain = post(api.client, "replace", image, engine="gradient")
            assert np.array_equal(pixels(api.client.get(answer.json()["download_url"]).content),
                                  pixels(api.client.get(plain.json()["download_url"]).content))
            failed = post(api.client, "replace", image, engine="runway", prompt="oak table", seed=6)
            assert failed.status_code == 500 and "runway" in failed.json()["detail"].lower()
    done = rows(config, "http")
    assert [(r["status"], r["bg_engine"]) for r in done] == [("done", "gradient"), ("done", "gradient"),
                                                              ("failed", "")]


def test_a_sidecar_may_not_fall_back_to_a_generation_the_inbox_does_not_use(tmp_path: Path) -> None:
    config = api_config(tmp_path, {"shop": {"rules": {"operation": "replace", "engine": "gradient"}}})
    inbox = config.inboxes[0]
    (inbox.path / "photo.jpg").write_bytes(b"")
    (inbox.path / "photo.yaml").write_text("fallback_engine: sdxl\n")
    with pytest.raises(SpecError, match="fallback_engine: 'sdxl' is not an engine this inbox allows"):
        rules.resolve(inbox.path / "photo.jpg", inbox, config)
    (inbox.path / "photo.yaml").write_text("fallback_engine: color\n")
    assert rules.resolve(inbox.path / "photo.jpg", inbox, config).spec.fallback_engine == "color"


@pytest.mark.slow
def test_bg_fallback_local_makes_a_failed_runway_generation_with_local_sdxl(tmp_path: Path, tiny_sdxl: Path,
                                                                              u2net_home: Path) -> None:
    with FakeRunway(statuses=["PENDING", "FAILED"]) as runway:
        data = {"state_dir": "state", "host": "testhost", "device": "cpu", "http": {"listen": "127.0.0.1:0"},
                "limits": {"generations_per_minute": 0},
                "runway": {"base_url": runway.url, "api_key": "k-test-runway", "poll_interval": 0.01},
                "defaults": {"mask": {"engine": "rembg", "model": "tiny.onnx"}}}
        config = parse_config(data, tmp_path / "config.yaml",
                              env={"BG_ENGINE": "runway", "MODEL_ID": str(tiny_sdxl), "BG_FALLBACK_LOCAL": "1"})
        with ApiDaemon(config) as api:
            answer = post(api.client, "replace", sample_bytes(tmp_path, 29, size=(128, 96)), prompt="oak table",
                          seed=7, steps=2)
            assert answer.status_code == 200, answer.text
            assert answer.json()["bg_engine"] == f"sdxl:{tiny_sdxl}", "made locally, and recorded so"
        assert [r.path for r in runway.requests if r.method == "POST"], "Runway was asked first"
    assert [(r["status"], r["bg_engine"]) for r in rows(config, "http")] == [("done", f"sdxl:{tiny_sdxl}")]
