"""Payload decoders, the plugin seam and channel templates (no broker needed)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from edgegw.mqtt import (
    PayloadError,
    TemplateError,
    UnknownPayloadDecoder,
    compile_template,
    decode_number,
    json_decoder,
    make_decoder,
)
from edgegw.topicfilter import filter_problem as check_filter


def test_json_reads_the_value_and_the_timestamp_at_their_paths() -> None:
    decode = json_decoder("value", "ts")
    assert decode(b'{"value": 25.5, "ts": 1700000000.25}') == (25.5, 1700000000.25)
    nested = json_decoder("data.sensors.1.v", "data.time")
    doc = b'{"data": {"sensors": [{"v": 1}, {"v": -3}], "time": "2024-01-02T03:04:05Z"}}'
    assert nested(doc) == (-3.0, 1704164645.0)
    assert json_decoder("v")(b'{"v": true}') == (1.0, None)  # no timestamp field: arrival
    assert json_decoder("")(b"42") == (42.0, None)  # the document itself


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b'{"temp": 1}', "no 'value' in the payload"),
    (b'{"value": "hot"}', "value is the string 'hot', not a number"),
    (b'{"value": null}', "value is null, not a number"),
    (b'{"value": NaN}', "value is not finite"),
    (b'{"value": 1, "ts": "yesterday"}', "ts 'yesterday' is not an ISO 8601 time"),
    (b'[1, 2]', "no 'value' in the payload"),
])
def test_json_junk_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as err:
        json_decoder("value", "ts")(payload)
    assert reason in str(err.value)


def test_number_payloads() -> None:
    assert decode_number(b" 21.75\n") == (21.75, None)
    for junk in (b"twelve", b"", b"inf", b"\xff"):
        with pytest.raises(PayloadError):
            decode_number(junk)


def test_a_plugin_decoder_is_found_by_its_entry_point(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A real (tiny) installed distribution with an edgegw.payloads entry point.
    (tmp_path / "csvpayload.py").write_text(textwrap.dedent("""
        def factory(options):
            column = int(options.get("column", 0))
            def decode(payload):
                return float(payload.decode().split(",")[column]), None
            return decode
    """))
    info = tmp_path / "csvpayload-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: csvpayload\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[edgegw.payloads]\ncsv = csvpayload:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    decode = make_decoder("csv", options={"column": 2})
    assert decode(b"a,b,3.5") == (3.5, None)
    sys.modules.pop("csvpayload", None)


def test_an_unknown_decoder_names_the_installed_ones() -> None:
    with pytest.raises(UnknownPayloadDecoder, match="installed: json, number"):
        make_decoder("protobuf-ish")


def test_channel_templates_use_topic_levels() -> None:
    t = compile_template("{1}.handler.temp", "ate/+/handler/temp")
    assert t("ate/ate-01/handler/temp") == "ate-01.handler.temp"
    assert compile_template("handler.temp", "ate/+/handler/temp")("ate/x/handler/temp") == (
        "handler.temp")
    assert compile_template("{-1}", "ate/+/handler/temp")("ate/x/handler/temp") == "temp"
    multi = compile_template("{1}.{#}", "ate/+/#")
    assert multi("ate/t7/prober/chuck/temp") == "t7.prober.chuck.temp"
    assert compile_template("{topic}", "#")("a/b/c") == "a.b.c"
    assert compile_template("{{literal}}.{0}", "x/y")("x/y") == "{literal}.x"


def test_a_level_missing_under_hash_is_an_error_for_that_message_only() -> None:
    t = compile_template("{3}", "ate/#")
    assert t("ate/a/b/c") == "c"
    with pytest.raises(TemplateError, match="has no level 3"):
        t("ate/a")


@pytest.mark.parametrize(("template", "topic_filter", "message"), [
    ("{5}", "a/+/c", "have 3 levels"),
    ("{#}", "a/+", "needs a filter ending in '#'"),
    ("{name}", "a/b", "unknown placeholder {name}"),
    ("{1", "a/b", "unbalanced"),
    ("{-1}", "a/#", "ambiguous under '#'"),
])
def test_bad_templates_are_refused(template: str, topic_filter: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        compile_template(template, topic_filter)


def test_topic_filters_are_checked() -> None:
    assert check_filter("ate/+/handler/#") is None
    assert check_filter("ate/#/x") is not None
    assert check_filter("ate/a+/x") is not None
    assert check_filter("") is not None


def test_the_example_config_builds() -> None:
    from edgegw.config import build, read_toml
    from edgegw.mqtt.source import MqttSourceConfig

    path = Path(__file__).resolve().parent.parent / "conf" / "gateway-mqtt.example.toml"
    (table,) = read_toml(path)["sources"]
    assert table.pop("type") == "mqtt" and table.pop("name") == "handler-sensors"
    config = build(MqttSourceConfig, table, str(path))
    assert [s.channel for s in config.subscriptions] == ["{1}.handler.{#}",
                                                         "{1}.prober.chuck_temp"]
