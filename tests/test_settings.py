"""Node settings (docs/contract.md §4): flag > env ``RECONCILER_<KEY>`` > file > default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.config.settings import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_PODMAN_URL,
    Settings,
    config_path,
    load_settings,
    write_settings_file,
)
from reconciler.core.errors import SettingsError
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.signing import RepositorySimulator

SETTINGS_ERROR = 2


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        'state_dir = "/from/file"\n'
        'hooks_dir = "/file/hooks"\n'
        "keep_applied = 5\n"
        "hook_timeout_s = 30\n"
        'opt_out_subclouds = ["eu-small"]\n',
        encoding="utf-8",
    )
    return path


def load(config: Path, *, env: dict[str, str] | None = None, **flags: object) -> Settings:
    return load_settings(config=str(config), overrides=flags, environ=env or {})


def error_of(call: Callable[[], object]) -> str:
    with pytest.raises(SettingsError) as caught:
        call()
    line = caught.value.one_line()
    assert "\n" not in line
    return line


def test_file_overrides_defaults(config: Path) -> None:
    settings = load(config)
    assert settings.state_dir == "/from/file"
    assert settings.keep_applied == 5
    assert settings.opt_out_subclouds == ("eu-small",)
    assert settings.disk_reserve_bytes == Settings().disk_reserve_bytes == 1 << 30


def test_environment_overrides_the_file(config: Path) -> None:
    settings = load(
        config,
        env={
            "RECONCILER_STATE_DIR": "/from/env",
            "RECONCILER_KEEP_APPLIED": "7",
            "RECONCILER_HOOK_TIMEOUT_S": "2.5",
            "RECONCILER_OPT_OUT_SUBCLOUDS": "a, b,",
            "RECONCILER_VRAM_MIB": "24576",
            "RECONCILER_FETCH_TIMEOUT_S": "0.5",
        },
    )
    assert settings.state_dir == "/from/env"
    assert settings.keep_applied == 7
    assert settings.hook_timeout_s == 2.5
    assert settings.opt_out_subclouds == ("a", "b")
    assert settings.vram_mib == 24576
    assert settings.fetch_timeout_s == 0.5
    assert settings.hooks_dir == "/file/hooks"  # untouched keys keep the file's value


def test_flags_override_the_environment(config: Path) -> None:
    settings = load(
        config,
        env={"RECONCILER_STATE_DIR": "/from/env", "RECONCILER_HOOKS_DIR": "/env/hooks"},
        state_dir="/from/flag",
        hooks_dir=None,  # a flag not given does not count
    )
    assert settings.state_dir == "/from/flag"
    assert settings.hooks_dir == "/env/hooks"


def test_unknown_key_in_the_file_names_the_key(config: Path) -> None:
    config.write_text('colour = "blue"\n', encoding="utf-8")
    assert error_of(lambda: load(config)) == f"{config}: unknown setting 'colour'"


def test_unknown_table_in_the_file_names_it(config: Path) -> None:
    config.write_text("[podman]\nurl = 'unix:///x'\n", encoding="utf-8")
    assert error_of(lambda: load(config)) == f"{config}: unknown setting 'podman'"


def test_file_that_does_not_parse_is_one_line(config: Path) -> None:
    config.write_text("keep_applied = = 3\n[broken\n", encoding="utf-8")
    message = error_of(lambda: load(config))
    assert message.startswith(f"settings file {config} does not parse: ")
    assert "line 1" in message


def test_file_that_is_not_utf8_is_a_settings_error(config: Path) -> None:
    config.write_bytes(b'origin = "\xff"\n')
    assert error_of(lambda: load(config)).startswith(f"settings file {config} does not parse")


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ('keep_applied = "two"', "keep_applied"),
        ("keep_applied = 2.0", "keep_applied"),
        ("download_concurrency = 0", "download_concurrency"),
        ('log_format = "xml"', "log_format"),
        ('origin = "ftp://origin.example/"', "origin"),
        ('podman_url = "/run/podman.sock"', "podman_url"),
        ('opt_out_subclouds = ["EU"]', "opt_out_subclouds/0"),
    ],
)
def test_value_of_the_wrong_shape_names_the_key(config: Path, line: str, where: str) -> None:
    config.write_text(line + "\n", encoding="utf-8")
    assert error_of(lambda: load(config)).startswith(f"{config}: {where}: ")


@pytest.mark.parametrize("value", ["0", "-1", "true"])
def test_fetch_timeout_must_be_a_positive_number(config: Path, value: str) -> None:
    config.write_text(f"fetch_timeout_s = {value}\n", encoding="utf-8")
    assert error_of(lambda: load(config)) == (
        f"{config}: fetch_timeout_s must be a positive number"
    )


def test_environment_value_that_is_not_a_number_names_the_variable(config: Path) -> None:
    assert error_of(lambda: load(config, env={"RECONCILER_KEEP_APPLIED": "many"})) == (
        "RECONCILER_KEEP_APPLIED='many' is not a number"
    )


def test_environment_value_of_the_wrong_shape_names_the_key(config: Path) -> None:
    message = error_of(lambda: load(config, env={"RECONCILER_LOG_FORMAT": "xml"}))
    assert message.startswith("environment: log_format: ")


def test_a_named_settings_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert error_of(lambda: load(missing)) == f"settings file {missing} does not exist"


def test_settings_file_comes_from_flag_then_env_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECONCILER_CONFIG", raising=False)
    assert config_path(None) == (DEFAULT_CONFIG_PATH, False)
    monkeypatch.setenv("RECONCILER_CONFIG", "/env/config.toml")
    assert config_path(None) == (Path("/env/config.toml"), True)
    assert config_path("/flag/config.toml") == (Path("/flag/config.toml"), True)


def test_podman_url_setting_beats_container_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    assert Settings().effective_podman_url == DEFAULT_PODMAN_URL
    monkeypatch.setenv("CONTAINER_HOST", "unix:///run/user/1000/podman/podman.sock")
    assert Settings().effective_podman_url == "unix:///run/user/1000/podman/podman.sock"
    assert Settings(podman_url="tcp://10.0.0.1:8888").effective_podman_url == (
        "tcp://10.0.0.1:8888"
    )


def test_written_settings_read_back_the_same(tmp_path: Path) -> None:
    written = Settings(
        origin="https://origin.example/config/",
        network="mainnet",
        root='/etc/reconciler/root "1".json',
        state_dir="/var/lib/réconciler\\x",
        hook_timeout_s=12.5,
        keep_applied=0,
        vram_mib=81920,
        opt_out_subclouds=("eu-small", "us-big"),
        fetch_timeout_s=7.0,
    )
    path = tmp_path / "config.toml"

    write_settings_file(path, written)

    assert load_settings(config=str(path), environ={}) == written


# ---- through the command ----------------------------------------------------------------


@pytest.fixture
def file_node(make_node: Callable[..., NodeUnderTest], tmp_path: Path) -> NodeUnderTest:
    origin = tmp_path / "origin"
    origin.mkdir()
    return make_node(origin.as_uri() + "/", RepositorySimulator().roots[1])


def test_command_line_flag_beats_env_which_beats_the_file(
    file_node: NodeUnderTest, tmp_path: Path
) -> None:
    # The file names the real state folder; env and flag point at empty ones, and the
    # error message shows which one the command used.
    assert f'state_dir = "{file_node.state_dir}"' in file_node.config.read_text()
    from_file = file_node.run("status", "--json", env={"RECONCILER_STATE_DIR": None})
    assert from_file.exit_code == 0, from_file.stderr

    from_env = file_node.run("status", env={"RECONCILER_STATE_DIR": str(tmp_path / "env")})
    assert from_env.error_line == (
        f"no state repository at {tmp_path / 'env' / 'snapshots'} (run `reconcile init`)"
    )

    from_flag = file_node.run(
        "--state-dir",
        str(tmp_path / "flag"),
        "status",
        env={"RECONCILER_STATE_DIR": str(tmp_path / "env")},
    )
    assert from_flag.error_line == (
        f"no state repository at {tmp_path / 'flag' / 'snapshots'} (run `reconcile init`)"
    )


def test_command_exits_2_naming_an_unknown_key(file_node: NodeUnderTest) -> None:
    with file_node.config.open("a", encoding="utf-8") as handle:
        handle.write("fetch_timout_s = 3\n")

    outcome = file_node.run("fetch")

    assert outcome.exit_code == SETTINGS_ERROR
    assert outcome.error_line == f"{file_node.config}: unknown setting 'fetch_timout_s'"


def test_command_exits_2_on_a_file_that_does_not_parse(file_node: NodeUnderTest) -> None:
    file_node.config.write_text("origin = \n", encoding="utf-8")

    outcome = file_node.run("status")

    assert outcome.exit_code == SETTINGS_ERROR
    assert outcome.error_line.startswith(f"settings file {file_node.config} does not parse: ")


def test_command_exits_2_on_a_bad_environment_value(file_node: NodeUnderTest) -> None:
    outcome = file_node.run("fetch", env={"RECONCILER_FETCH_TIMEOUT_S": "soon"})

    assert outcome.exit_code == SETTINGS_ERROR
    assert outcome.error_line == "RECONCILER_FETCH_TIMEOUT_S='soon' is not a number"


def test_config_flag_beats_reconciler_config(file_node: NodeUnderTest, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("nonsense = 1\n", encoding="utf-8")

    outcome = file_node.run("--config", str(other), "status")

    assert outcome.exit_code == SETTINGS_ERROR
    assert outcome.error_line == f"{other}: unknown setting 'nonsense'"
