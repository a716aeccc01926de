import pytest

from sidecar.config import load_config, parse_size
from sidecar.errors import ConfigError
from sidecar.redact import redact, strip_userinfo


def test_sizes():
    assert parse_size("50G") == 50 * 1024**3
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size("100") == 100
    with pytest.raises(ConfigError, match="cache_size"):
        parse_size("lots", "cache_size")


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cache_size: 1G\njobs: 4\nremotes:\n  storage:\n    url: s3://a/b\n    region: eu-west-1\n")
    env = {"DDA_JOBS": "8", "DDA_REMOTE_STORAGE_ACCESS_KEY_ID": "AK", "DDA_REMOTE_STORAGE_SECRET_ACCESS_KEY": "SK",
           "DDA_REPO": "https://x/y.git", "DDA_REVISION": "v1"}
    config = load_config({"jobs": "12"}, env=env, config_file=f)
    assert config.cache_size == 1024**3
    assert config.jobs == 12
    assert config.repo == "https://x/y.git" and config.revision == "v1"
    assert config.remotes["storage"] == {"url": "s3://a/b", "region": "eu-west-1", "access_key_id": "AK",
                                         "secret_access_key": "SK"}
    assert set(config.secrets()) == {"SK"}


def test_bad_config_file_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cache_sise: 1G\n")
    with pytest.raises(ConfigError, match="unknown setting 'cache_sise'"):
        load_config({}, env={}, config_file=f)
    with pytest.raises(ConfigError, match="jobs"):
        load_config({"jobs": "zero"}, env={})


def test_credentials_are_redacted():
    clean, user, token = strip_userinfo("https://alice:s3cr3t-tok@host/o/r.git")
    assert (clean, user, token) == ("https://host/o/r.git", "alice", "s3cr3t-tok")
    text = redact("fatal: could not read https://alice:s3cr3t-tok@host/o/r.git; token s3cr3t-tok", ["s3cr3t-tok"])
    assert "s3cr3t" not in text and "alice" not in text
