"""The real peers the other tests rely on start and answer."""

from sqlalchemy import inspect

from db.session import make_engine


def test_database_is_migrated(database_url):
    tables = set(inspect(make_engine(database_url)).get_table_names())
    assert {"studies", "series", "instances", "pipeline_runs", "associations", "quarantine"} <= tables


def test_redis_answers(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.ping() is True


def test_orthanc_answers(orthanc):
    assert orthanc.get_json("/system")["DicomAet"] == "ORTHANC"
