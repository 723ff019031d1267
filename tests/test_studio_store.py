"""The studio store around the behaviour suite: `store:` and BGWATCH_STORE, passwords never shown,
migrations (once, under concurrency, a newer schema refused), a server away or restarted, and
`bgwatch store migrate` importing a workstation's SQLite history."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from bgwatch.config import parse_config
from bgwatch.errors import ConfigError
from bgwatch.jobs import JobState
from bgwatch.storebase import StoreUnavailable, redact, scrub
from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url


def test_store_defaults_to_sqlite_and_takes_a_url_or_the_environment() -> None:
    assert parse_config({}, env={}).store == "sqlite"
    url = "postgresql://bgwatch:hunter2@db.studio/bgwatch"
    assert parse_config({"store": url}, env={}).store == url
    assert parse_config({"store": "sqlite"}, env={"BGWATCH_STORE": url}).store == url


def test_a_bad_store_is_one_line_naming_the_key_without_the_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": "mysql://bob:hunter2@db/x"}, tmp_path / "config.yaml", env={})
    assert "store" in str(caught.value) and "postgresql://" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="BGWATCH_STORE") as caught:
        parse_config({}, env={"BGWATCH_STORE": "redis://u:hunter2@x"})
    assert "hunter2" not in str(caught.value)


def test_the_config_repr_never_carries_the_url() -> None:
    config = parse_config({"store": "postgresql://bob:hunter2@db/x"}, env={})
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://bob:s3cr%40t@db:5432/bgwatch?sslmode=require", "postgresql://bob:***@db:5432/bgwatch?sslmode=require"),
    ("postgresql://bob@db/bgwatch?password=hunter2&sslmode=require",
     "postgresql://bob@db/bgwatch?password=***&sslmode=require"),
    ("host=db user=bob password=hunter2 dbname=x", "host=db user=bob password=*** dbname=x"),
    ("postgresql://bob@/bgwatch?host=/run/postgresql", "postgresql://bob@/bgwatch?host=/run/postgresql"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_scrub_takes_the_password_out_of_a_drivers_message() -> None:
    url = "postgresql://bob:s3cr%40t@db/x"
    text = scrub(f"connection to {url} failed: password s3cr@t rejected", url)
    assert "s3cr" not in text and "postgresql://bob:***@db/x" in text


def test_an_unreachable_server_is_store_unavailable_without_the_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    from bgwatch.pgstore import PgStore

    url = f"postgresql://bob:hunter2@/bgwatch?host={tmp_path}&port=5999"
    with pytest.raises(StoreUnavailable) as caught:
        PgStore(url, connect_timeout=1)
    assert "hunter2" not in str(caught.value) and "bob:***@" in str(caught.value)


def test_migrations_apply_once_even_when_hosts_start_together(pg_url: str) -> None:
    from bgwatch import pgschema
    from bgwatch.pgstore import PgStore

    stores: list[Any] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PgStore(pg_url))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for s in stores for v in s.migrated) == [v for v, _n, _s in pgschema.MIGRATIONS]
    assert stores[0].schema_versions() == [v for v, _n, _s in pgschema.MIGRATIONS]
    assert stores[0].server_version().split(".")[0].isdigit()
    for s in stores:
        s.close()


def test_a_database_newer_than_this_bgwatch_is_refused(pg_url: str) -> None:
    from bgwatch.pgstore import PgStore

    store = PgStore(pg_url)
    with store.connection() as conn:
        conn.execute("INSERT INTO bgwatch_schema (version, name) VALUES (999, 'from the future')")
    store.close()
    with pytest.raises(ConfigError, match="newer than this bgwatch"):
        PgStore(pg_url)


def test_after_a_restart_the_store_serves_again_having_failed_only_as_unavailable(pg_cluster: Any, pg_url: str) -> None:
    from bgwatch.pgstore import PgStore

    store = PgStore(pg_url, host="h1", connect_timeout=2)
    first = store.add_run(key="k", inbox="/in", rel_path="a.jpg", source_path="", input_sha256="", spec_json="",
                          host="h1")
    pg_cluster.restart()
    outcomes: list[str] = []
    for _ in range(20):
        try:
            second = store.add_run(key="k", inbox="/in", rel_path="b.jpg", source_path="", input_sha256="",
                                   spec_json="", host="h1")
            break
        except StoreUnavailable as exc:  # the callers' "busy, try later" path
            outcomes.append(str(exc))
    else:
        pytest.fail(f"the store did not come back: {outcomes[-1:]}")
    assert second > first and store.get_run(first) is not None
    store.close()


def test_store_migrate_imports_a_workstations_history_once(tmp_path: Path, pg_url: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from bgwatch.cli import main
    from bgwatch.pgstore import PgStore
    from bgwatch.store import Store

    local = Store(tmp_path / "state" / "bgwatch.db", clock=lambda: 1_234.0)
    done = local.add_run(key="k1", inbox="/in", rel_path="ring-042.jpg", source_path="/in/.c/ring-042.jpg",
                         input_sha256="ab", spec_json="{}", host="ws1")
    local.start_run(done, "ws1")
    local.finish_run(done, JobState.DONE, output_path="/out/ring-042.png", mask_engine="classical", seed=5,
                     timings={"total": 1.25})
    failed = local.add_run(key="k2", inbox="/in", rel_path="b.jpg", source_path="", input_sha256="",
                           spec_json="{}", host="ws1")
    local.finish_run(failed, JobState.FAILED, error="broken")
    local.put_background({"key": "bg1", "engine": "sdxl", "path": "/cache/bg1.png", "bytes": 10})
    local.close()
    studio = PgStore(pg_url, host="ws2")
    studio.add_run(key="k9", inbox="/in", rel_path="c.jpg", source_path="", input_sha256="", spec_json="{}",
                   host="ws2")
    password_url = pg_url.replace("postgresql://bgwatch@", "postgresql://bgwatch:hunter2@")

    assert main(["store", "migrate", str(tmp_path / "state"), password_url]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) imported" in out and "1 background(s) imported" in out and "hunter2" not in out
    assert main(["store", "migrate", str(tmp_path / "state" / "bgwatch.db"), password_url]) == 0
    assert "0 run(s) imported (2 already there)" in capsys.readouterr().out

    rows = {r["rel_path"]: r for r in studio.history()}
    assert set(rows) == {"ring-042.jpg", "b.jpg", "c.jpg"}
    ring = rows["ring-042.jpg"]
    assert (ring["host"], ring["status"], ring["output_path"], ring["seed"], ring["created_at"]) == (
        "ws1", "done", "/out/ring-042.png", 5, 1_234.0)
    assert rows["b.jpg"]["error"] == "broken"
    assert studio.get_background("bg1")["path"] == "/cache/bg1.png"
    studio.close()


def test_store_migrate_refuses_what_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bgwatch.cli import main

    assert main(["store", "migrate", str(tmp_path), "postgresql://bob:hunter2@/x?host=/nowhere"]) == 2
    assert "no SQLite history here" in capsys.readouterr().err
    (tmp_path / "bgwatch.db").write_bytes(b"")
    assert main(["store", "migrate", str(tmp_path), "mysql://bob:hunter2@db/x"]) == 2
    err = capsys.readouterr().err
    assert "TO" in err and "hunter2" not in err


def test_doctor_checks_the_connection_the_server_and_the_migrations(pg_url: str, tmp_path: Path) -> None:
    from bgwatch.doctor import Level
    from bgwatch.pgstore import PgStore
    from bgwatch.studio import store_checks

    assert store_checks(parse_config({}, env={})) == []  # SQLite: nothing to say
    studio = {"store": pg_url, "cache": {"dir": str(tmp_path / "share-cache")}}
    fresh = store_checks(parse_config(studio, env={}))
    assert [c.level for c in fresh] == [Level.OK, Level.WARNING] and "migration(s) to apply" in fresh[1].message
    PgStore(pg_url).close()  # a daemon's start migrates it
    done = store_checks(parse_config(studio, env={}))
    assert [c.level for c in done] == [Level.OK, Level.OK] and "PostgreSQL" in done[0].message
    local_cache = store_checks(parse_config({"store": pg_url}, env={}))
    assert [(c.subject, c.level) for c in local_cache][1] == ("cache.dir", Level.WARNING)
    away = f"postgresql://bob:hunter2@/x?host={tmp_path}&port=5999"
    [failed] = store_checks(parse_config({"store": away}, env={}))
    assert failed.level is Level.ERROR and "hunter2" not in str(failed.to_dict()) and "bob:***@" in failed.subject


def test_metrics_show_each_host_of_the_studio(pg_url: str, tmp_path: Path) -> None:
    from bgwatch.metrics import Metrics
    from bgwatch.pgstore import PgStore
    from bgwatch.studio import watch_studio

    store = PgStore(pg_url, host="ws1")
    store.beat("ws1", 2)
    store.beat("ws2", 0)
    store.add_run(key="k", inbox="/in", rel_path="a.jpg", source_path="", input_sha256="", spec_json="", host="ws2")
    metrics = Metrics()
    watch_studio(metrics, store, lease_seconds=30)
    text = metrics.render().decode()
    assert "bgwatch_studio_store_up 1.0" in text
    assert 'bgwatch_studio_host_up{host="ws1"} 1.0' in text and 'bgwatch_studio_host_up{host="ws2"} 1.0' in text
    assert 'bgwatch_studio_host_jobs_in_flight{host="ws1"} 2.0' in text
    assert 'bgwatch_studio_runs{status="queued"} 1.0' in text
    store.close()
    sqlite_metrics = Metrics()
    from bgwatch.store import Store

    local = Store(tmp_path / "bgwatch.db")
    watch_studio(sqlite_metrics, local, lease_seconds=30)  # one workstation: nothing more to show
    assert "bgwatch_studio" not in sqlite_metrics.render().decode()
    local.close()


def test_an_http_run_is_readable_from_any_host_with_its_download_on_the_share(pg_url: str, tmp_path: Path) -> None:
    from bgwatch.httpjobs import HTTP_INBOX
    from bgwatch.httpresults import ResultsFolder
    from bgwatch.pgstore import PgStore

    results = tmp_path / "share" / "http-results"  # http.results_dir on the share, the same for every host
    results.mkdir(parents=True)
    (results / "photo-7.png").write_bytes(b"png")
    made_on, asked_on = PgStore(pg_url, host="ws1"), PgStore(pg_url, host="ws2")
    run = made_on.add_run(key="k", inbox=HTTP_INBOX, rel_path="photo.jpg", source_path="", input_sha256="",
                          spec_json="{}", host="ws1")
    made_on.finish_run(run, JobState.DONE, output_path=str(results / "photo-7.png"))
    record = ResultsFolder(results, private=False).run_record(asked_on, run, HTTP_INBOX)
    assert record is not None and record["status"] == "done" and record["download_url"] == "/download/photo-7.png"
    made_on.close()
    asked_on.close()
