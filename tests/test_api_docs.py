"""/docs and /redoc work with no network (Swagger UI and ReDoc from an installed package), and the OpenAPI
schema says what the API answers: the original service's fields, images from /download, the error codes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.apihelpers import ApiDaemon, api_config
from tests.helpers import chromium


def test_the_docs_load_nothing_from_the_network_and_the_schema_is_real(tmp_path: Path) -> None:
    with ApiDaemon(api_config(tmp_path)) as api:
        for page in ("/docs", "/redoc"):
            html = api.client.get(page).text
            urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
            urls += re.findall(r"""(?:url|openapi_url|spec-url)\s*:\s*["']([^"']+)["']""", html)
            assert urls and all(u.startswith("/") for u in urls), f"{page} loads {urls}"
            for url in urls:
                assert api.client.get(url).status_code == 200, url
        schema = api.client.get("/openapi.json").json()
    cleanup = schema["paths"]["/background/cleanup"]["post"]
    assert cleanup["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Processed")
    assert {"200", "202", "400", "401", "408", "413", "422", "429", "500", "503"} <= set(cleanup["responses"])
    processed = schema["components"]["schemas"]["Processed"]["properties"]
    assert {"success", "output_path", "message", "run_id", "download_url"} <= set(processed)
    failure = schema["components"]["schemas"]["Failure"]["properties"]
    assert {"success", "detail"} <= set(failure)
    form = cleanup["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["blur_radius"]["maximum"] == 200 and form["desaturate_pct"]["maximum"] == 100
    download = schema["paths"]["/download/{filename}"]["get"]["responses"]["200"]["content"]
    assert set(download) == {"image/png", "image/jpeg", "image/webp"}
    health = schema["components"]["schemas"]["Health"]["properties"]
    assert {"status", "engine", "device"} <= set(health)


@pytest.mark.slow
def test_docs_render_offline_in_headless_chromium(tmp_path: Path) -> None:
    browser_path = chromium()
    # Every host but loopback resolves to nothing: a page that needs a CDN renders blank.
    browser = [browser_path, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1200,1400"]
    shot = tmp_path / "docs.png"
    with ApiDaemon(api_config(tmp_path)) as api:
        url = f"{api.client.base_url}".rstrip("/")
        dom = subprocess.run([*browser, "--dump-dom", f"{url}/docs"], capture_output=True, text=True, timeout=90)
        subprocess.run([*browser, f"--screenshot={shot}", f"{url}/docs"], capture_output=True, timeout=90)
    for endpoint in ("/background/cleanup", "/background/replace", "/download/{filename}", "/health"):
        assert endpoint in dom.stdout, f"{endpoint} is not listed on the rendered /docs"
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    print(f"screenshot of /docs rendered offline: {shot}")
