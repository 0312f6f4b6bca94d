"""The PostgreSQL test cluster: private, loopback only, password-protected, removed after."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from xmpp_sm_tracker.testing.postgres import RUN_AS, PostgresServer


def test_a_cluster_starts_answers_and_is_removed() -> None:
    with PostgresServer(database="harness") as pg:
        base = pg.base_dir
        assert base is not None and pg.running
        assert pg.dsn.startswith(f"postgresql://xmpp_sm_test:{pg.password}@127.0.0.1:{pg.port}/")
        if os.geteuid() == 0:  # initdb refuses root: the cluster is the system user's
            import pwd

            assert base.stat().st_uid == pwd.getpwnam(RUN_AS).pw_uid

        async def ask() -> tuple[str, str, str]:
            conn = await asyncpg.connect(pg.dsn)
            try:
                row = await conn.fetchrow(
                    "SELECT current_database(), current_setting('listen_addresses'), current_user"
                )
                assert row is not None
                return (str(row[0]), str(row[1]), str(row[2]))
            finally:
                await conn.close()

        assert asyncio.run(ask()) == ("harness", "127.0.0.1", "xmpp_sm_test")

        async def wrong_password() -> None:
            conn = await asyncpg.connect(pg.dsn.replace(pg.password, "wrong"))
            await conn.close()

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(wrong_password())
    assert not base.exists()
    assert not pg.running
    pg.stop()  # twice is harmless
