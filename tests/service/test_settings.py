import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from exitserve.service.settings import DEFAULT_BUNDLE, Settings


def test_defaults_serve_the_committed_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("EXITSERVE_BUNDLES", "EXITSERVE_DEFAULT_DELTA"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.bundles == [DEFAULT_BUNDLE] and (DEFAULT_BUNDLE / "manifest.json").is_file()
    assert settings.max_queue_delay_ms == 0.0 and settings.default_policy == "pcee-lb-tail"


@pytest.mark.parametrize("value", ["/a/one,/b/two", " /a/one , /b/two ", '["/a/one", "/b/two"]'])
def test_bundles_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("EXITSERVE_BUNDLES", value)
    assert Settings().bundles == [Path("/a/one"), Path("/b/two")]


def test_out_of_range_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITSERVE_DEFAULT_DELTA", "1.5")
    with pytest.raises(ValidationError, match="default_delta"):
        Settings()


def test_warmup_sizes_cover_every_batch_size_up_to_the_limit() -> None:
    assert Settings(max_batch_size=20).warmup_sizes() == [1, 2, 4, 8, 16, 20]
    assert Settings(warmup_batch_sizes=[8, 1, 8]).warmup_sizes() == [1, 8]


@pytest.mark.parametrize(("key", "why"), [("", "empty"), ("a-long-enough-key ", "whitespace"), (" a-long-enough-key", "whitespace"),
                                          ("a-long-enough-kéy", "non-ASCII"), ("a-long-enough\tkey", "whitespace|control")])
@pytest.mark.parametrize("name", ["api_key", "admin_api_key"])
def test_keys_no_client_could_send_refuse_to_start(name: str, key: str, why: str) -> None:
    with pytest.raises(ValidationError, match=f"{name}(.|\\n)*({why})"):
        Settings(**{name: key})


def test_a_short_key_starts_with_a_warning(caplog: pytest.LogCaptureFixture, digits_bundle: Path) -> None:
    from exitserve.service.app import create_app

    with caplog.at_level(logging.WARNING, logger="exitserve.http"):
        create_app(Settings(bundles=[digits_bundle], api_key="short", admin_api_key="a-key-of-24-characters!!"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("api_key is shorter than 16 characters")
