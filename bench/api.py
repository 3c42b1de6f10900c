"""Benchmark: the HTTP API's overhead over its own SQL.

10,000 processed studies (findings, organ measurements, result objects, worklist items) are COPYed into a fresh
PostgreSQL. 20 concurrent clients (threads, one keep-alive httpx client each) call a real uvicorn server on
loopback:  ``GET /worklist?limit=50``  and  ``GET /studies/{uid}/findings`` (random uids). The reference is the
exact same SQL those endpoints run (captured from SQLAlchemy beforehand, per uid), executed through psycopg by
20 concurrent threads with their own connections, in the same run. Rounds alternate API/direct to share noise.

Prints p50/p95 of each, and as the LAST line ``api_overhead_ratio=<API p95 / direct p95>`` for the worse of the
two endpoints.

    /tmp/venv0/bin/python bench/api.py [--studies 10000] [--clients 20] [--requests 15] [--rounds 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "bench-read-token"
FINDINGS_PER_STUDY = 8
FINDINGS = [  # (question_id, code, meaning, organ, weight, critical)
    ("lung_nodule", "786838002", "Nodule of lung", "lung_left", 5.0, False),
    ("pleural_effusion", "60046008", "Pleural effusion", "pleura", 8.0, False),
    ("pneumothorax", "36118008", "Pneumothorax", "lung_right", 50.0, True),
    ("emphysema", "87433001", "Pulmonary emphysema", "lung", 3.0, False),
    ("liver_lesion", "300331000", "Lesion of liver", "liver", 12.0, False),
    ("kidney_stone", "95570007", "Kidney stone", "kidney_left", 4.0, False),
    ("ascites", "389026000", "Ascites", "abdomen", 10.0, False),
    ("splenomegaly", "16294009", "Splenomegaly", "spleen", 6.0, False),
]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "lung_left"]


def bench_app():
    """uvicorn factory for the benchmark's server (settings from the environment, one read token)."""
    from api.app import create_app
    from api.settings import ApiAuthSettings
    from omnict_node.config import load_settings

    threads = int(os.environ.get("BENCH_THREADS", "0")) or None
    app = create_app(load_settings(), auth=ApiAuthSettings(tokens=[{"name": "bench", "role": "read", "token": TOKEN}]),
                     max_threads=threads)
    return app


# ---------------------------------------------------------------------------------------------------------------
def populate(dsn: str, studies: int, seed: int = 7) -> list[str]:
    """COPY ``studies`` processed studies into the database; returns their Study Instance UIDs."""
    import psycopg

    rng = random.Random(seed)
    now = dt.datetime.now(dt.timezone.utc)
    uids = [f"1.2.826.0.1.3680043.8.498.{10**9 + i}" for i in range(studies)]
    priorities = [None, "ROUTINE", "ROUTINE", "HIGH", "STAT", "LOW", "MEDIUM"]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY studies (id, study_instance_uid, modalities, study_date, requested_priority, "
                      "first_received_at, last_received_at, instance_count, created_at) FROM STDIN") as copy:
            for i, uid in enumerate(uids, 1):
                at = now - dt.timedelta(minutes=rng.randint(0, 72 * 60))
                copy.write_row((i, uid, "CT", "20261122", rng.choice(priorities), at, at, 300, at))
        with cur.copy("COPY pipeline_runs (id, study_id, run_number, state, trigger, opened_at, completed_at, "
                      "finished_at, updated_at) FROM STDIN") as copy:
            for i in range(1, studies + 1):
                copy.write_row((i, i, 1, "delivered", "received", now, now, now, now))
        urgency: dict[int, tuple[float, bool]] = {}
        with cur.copy("COPY findings (id, run_id, question_id, question, answer, organ, code_value, code_scheme, "
                      "code_meaning, positive, critical, urgency_weight, key_slices, key_sop_instance_uids) "
                      "FROM STDIN") as copy:
            fid = 0
            for run in range(1, studies + 1):
                weights, stat = [], False
                for qid, code, meaning, organ, weight, critical in FINDINGS[:FINDINGS_PER_STUDY]:
                    fid += 1
                    positive = rng.random() < (0.02 if critical else 0.15)
                    if positive:
                        weights.append(weight)
                        stat |= critical
                    copy.write_row((fid, run, qid, f"Is there {meaning.lower()}?",
                                    f"{'Yes' if positive else 'No'}, {meaning.lower()} {'present' if positive else 'absent'}.",
                                    organ, code, "SCT", meaning, positive, critical and positive, weight,
                                    "[12, 13]", f'["{uids[run - 1]}.{fid}"]'))
                weights.sort(reverse=True)
                urgency[run] = ((weights[0] + 0.25 * sum(weights[1:])) if weights else 0.0, stat)
        with cur.copy("COPY organ_measurements (run_id, organ, volume_ml, mean_hu, std_hu) FROM STDIN") as copy:
            for run in range(1, studies + 1):
                for organ in ORGANS:
                    copy.write_row((run, organ, rng.uniform(100, 2000), rng.uniform(-50, 80), rng.uniform(5, 30)))
        with cur.copy("COPY result_objects (run_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid, "
                      "study_instance_uid, path, size_bytes, created_at) FROM STDIN") as copy:
            for run in range(1, studies + 1):
                uid = uids[run - 1]
                for k, (kind, cls) in enumerate([("measurement_sr", "1.2.840.10008.5.1.4.1.1.88.34"),
                                                 ("seg", "1.2.840.10008.5.1.4.1.1.66.4"),
                                                 ("kos", "1.2.840.10008.5.1.4.1.1.88.59")]):
                    copy.write_row((run, kind, cls, f"{uid}.9{k}", f"{uid}.8{k}", uid, f"results/{uid}/{kind}.dcm",
                                    1000, now))
        priority_of = dict(cur.execute("SELECT id, requested_priority FROM studies").fetchall())
        with cur.copy("COPY worklist_items (study_id, run_id, urgency_score, stat, requested_priority, ready_at, "
                      "status, updated_at) FROM STDIN") as copy:
            for run in range(1, studies + 1):
                score, stat = urgency[run]
                status = rng.choices(["unread", "claimed", "completed"], [0.6, 0.1, 0.3])[0]
                copy.write_row((run, run, score, stat, priority_of[run],
                                now - dt.timedelta(minutes=rng.randint(0, 72 * 60)), status, now))
        for table in ("studies", "pipeline_runs", "findings"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
    return uids


# ---------------------------------------------------------------------------------------------------------------
def capture_sql(url: str, uids: list[str]) -> tuple[list[tuple[str, dict]], dict[str, list[tuple[str, dict]]]]:
    """The exact statements (SQL text + parameters) the two endpoints run: the worklist page, and the findings of
    each uid in ``uids``. Captured from SQLAlchemy's cursor events while running the API's own query functions."""
    from sqlalchemy import event

    from api.queries import study_findings
    from api.settings import WorklistRules
    from api.worklist import list_worklist
    from db.session import make_engine, make_session_factory

    engine = make_engine(url)
    recorded: list[tuple[str, dict]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if not statement.startswith(("BEGIN", "ROLLBACK", "select pg_catalog", "SELECT 1")):
            recorded.append((statement, parameters))

    factory = make_session_factory(engine)
    rules = WorklistRules()
    with factory() as session:
        list_worklist(session, rules, limit=50)
    worklist_sql = list(recorded)
    findings_sql: dict[str, list[tuple[str, dict]]] = {}
    for uid in uids:
        recorded.clear()
        with factory() as session:
            study_findings(session, uid, rules)
        findings_sql[uid] = list(recorded)
    engine.dispose()
    return worklist_sql, findings_sql


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_clients(clients: int, requests: int, make_worker) -> list[float]:
    """``clients`` threads, each doing ``requests`` timed calls (after 2 untimed warm-ups); all latencies (s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def body(index: int) -> None:
        call, close = make_worker(index)
        try:
            for _ in range(2):
                call()
            barrier.wait()
            mine = []
            for _ in range(requests):
                started = time.perf_counter()
                call()
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)
        finally:
            close()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return latencies


def api_worker_factory(base_url: str, endpoint: str, uids: list[str]):
    import httpx

    def make(index: int):
        rng = random.Random(1000 + index)
        client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

        def call() -> None:
            path = "/worklist?limit=50" if endpoint == "worklist" else f"/studies/{rng.choice(uids)}/findings"
            response = client.get(path)
            response.raise_for_status()
            response.json()

        return call, client.close

    return make


def direct_worker_factory(dsn: str, endpoint: str, worklist_sql, findings_sql):
    import psycopg

    uids = list(findings_sql)

    def make(index: int):
        rng = random.Random(1000 + index)
        conn = psycopg.connect(dsn)

        def call() -> None:
            statements = worklist_sql if endpoint == "worklist" else findings_sql[rng.choice(uids)]
            with conn.cursor() as cur:
                for sql, params in statements:
                    cur.execute(sql, params)
                    cur.fetchall()
            conn.rollback()  # the same transaction shape as a read-only ORM session

        return call, conn.close

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=15, help="timed requests per client per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; API and direct alternate within each")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--threads", type=int, default=0, help="threadpool size per worker (0: the app's default)")
    parser.add_argument("--uid-pool", type=int, default=400, help="random uids queried by /findings")
    args = parser.parse_args()

    from db.migrate import upgrade
    from tests.services import free_port, start_postgres, wait_for_port

    # SIGTERM (timeout, an impatient operator) must still stop the PostgreSQL and uvicorn we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server_pg = start_postgres()
    uvicorn_process = None
    try:
        url = server_pg.create_database("omnict_bench")
        upgrade(url)
        dsn = f"host=127.0.0.1 port={server_pg.port} user=postgres dbname=omnict_bench"
        started = time.perf_counter()
        uids = populate(dsn, args.studies)
        print(f"populated {args.studies} studies ({args.studies * FINDINGS_PER_STUDY} findings) "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        pool = random.Random(3).sample(uids, min(args.uid_pool, len(uids)))
        worklist_sql, findings_sql = capture_sql(url, pool)
        print(f"SQL per request: worklist {len(worklist_sql)} statements, findings "
              f"{statistics.mean(len(v) for v in findings_sql.values()):.0f} statements", flush=True)

        port = free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="omnict-bench-api-"))
        env = dict(os.environ, BENCH_THREADS=str(args.threads), OMNICT_DATABASE__URL=url, OMNICT_DATA_DIR=str(data_dir), OMNICT_LOG_LEVEL="WARNING",
                   PYTHONPATH=str(REPO))
        uvicorn_process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.api:bench_app", "--factory", "--host", "127.0.0.1", "--port",
             str(port), "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
            cwd=REPO, env=env)
        wait_for_port(port, 60)
        base_url = f"http://127.0.0.1:{port}"

        results: dict[tuple[str, str], list[float]] = {}
        for round_index in range(args.rounds):
            for endpoint in ("worklist", "findings"):
                order = ["api", "direct"] if round_index % 2 == 0 else ["direct", "api"]
                for kind in order:
                    factory = (api_worker_factory(base_url, endpoint, pool) if kind == "api"
                               else direct_worker_factory(dsn, endpoint, worklist_sql, findings_sql))
                    results.setdefault((endpoint, kind), []).extend(run_clients(args.clients, args.requests, factory))

        ratios = {}
        print(f"{'endpoint':<10} {'path':<7} {'n':>5} {'p50 ms':>8} {'p95 ms':>8}")
        for endpoint in ("worklist", "findings"):
            p95 = {}
            for kind in ("api", "direct"):
                values = results[(endpoint, kind)]
                p95[kind] = percentile(values, 95)
                print(f"{endpoint:<10} {kind:<7} {len(values):>5} {percentile(values, 50) * 1e3:>8.2f} "
                      f"{p95[kind] * 1e3:>8.2f}")
            ratios[endpoint] = p95["api"] / p95["direct"]
            print(f"{endpoint}_p95_ratio={ratios[endpoint]:.2f}")
        worse = max(ratios, key=ratios.get)
        print(f"(last line: the worse endpoint, {worse}; {args.studies} studies, {args.clients} clients, "
              f"{args.workers} uvicorn workers, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        print(f"api_overhead_ratio={ratios[worse]:.2f}")
    finally:
        if uvicorn_process is not None:
            uvicorn_process.terminate()
            uvicorn_process.wait(20)
        server_pg.stop()


if __name__ == "__main__":
    main()
