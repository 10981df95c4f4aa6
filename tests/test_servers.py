"""The test servers themselves. (The mlflow server helper is exercised end to end, proxied artifacts,
stop/kill/restart on the same port included, by tests/test_tracking.py and tests/test_security.py.)"""

from __future__ import annotations

import socket

from tests.servers import free_port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_postgres_cluster_listens_on_loopback_and_creates_databases(postgres):
    import sqlalchemy

    assert postgres.url.startswith(f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/")
    url = postgres.new_database()
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 40 + 2")).scalar() == 42
            listen = conn.execute(sqlalchemy.text("show listen_addresses")).scalar()
            assert listen == "127.0.0.1"
    finally:
        engine.dispose()
    assert _port_open(postgres.port)
