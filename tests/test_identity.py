"""From a certificate's CN to a device: the name pattern, broken early CNs, and the query check."""

import pytest

from configserver.identity import (
    DeviceIdentity,
    InvalidDeviceName,
    normalize_mac,
    parse_device_name,
    query_names_other_device,
)


@pytest.mark.parametrize(
    "cn, hwid, model, mac",
    [
        ("IP232-30-00-af", "IP232-30-00-af", "IP232", "00-90-33-30-00-af"),
        ("IP232-30-00-AF", "IP232-30-00-af", "IP232", "00-90-33-30-00-af"),
        ("IP1202-35-fe-4d", "IP1202-35-fe-4d", "IP1202", "00-90-33-35-fe-4d"),
        ("IP29-4-10-20-30", "IP29-4-10-20-30", "IP29-4", "00-90-33-10-20-30"),
        # the broken CNs of early certificates
        ("IP222s-30-00-af", "IP222-30-00-af", "IP222", "00-90-33-30-00-af"),
        ("IP232s-30-00-af", "IP232-30-00-af", "IP232", "00-90-33-30-00-af"),
        ("IP240a-30-00-af", "IP240-30-00-af", "IP240", "00-90-33-30-00-af"),
        ("IP200a-30-00-af", "IP200-30-00-af", "IP200", "00-90-33-30-00-af"),
    ],
)
def test_device_names_split_into_hwid_model_and_mac(cn, hwid, model, mac):
    name = parse_device_name(cn)
    assert (name.hwid, name.model, name.mac) == (hwid, model, mac)


def test_settings_can_extend_the_broken_name_table():
    assert parse_device_name("IP111x-01-02-03", {"IP111x": "IP111"}).hwid == "IP111-01-02-03"


@pytest.mark.parametrize(
    "cn",
    [
        "IP232-30-00-af\n",        # trailing newline
        "IP232-30-00-a",
        "IP232-30-00-afa",
        "IP232-30-00-zz",
        "IP232-30-00",
        "-30-00-af",
        "IP232_30-00-af",
        "../../etc/passwd",
        "IP232-30-00-af/../x",
        "IP232-30-00-\u0430f",     # Cyrillic a
        "IP232-30-00-\uff41f",     # full-width a
        "IP232-\u0663\u0660-00-af",  # Arabic-Indic digits
        "IP 232-30-00-af",
        "",
        "A" * 40 + "-30-00-af",
    ],
)
def test_anything_else_is_not_a_device_name(cn):
    with pytest.raises(InvalidDeviceName):
        parse_device_name(cn)


@pytest.mark.parametrize(
    "text, mac",
    [
        ("0090333000af", "00-90-33-30-00-af"),
        ("00:90:33:30:00:AF", "00-90-33-30-00-af"),
        ("00-90-33-30-00-af", "00-90-33-30-00-af"),
        ("0090333000a", None),
        ("IP232-30-00-af", None),
    ],
)
def test_macs_are_normalized(text, mac):
    assert normalize_mac(text) == mac


PHONE = DeviceIdentity(hwid="IP222-30-00-af", model="IP222", mac="00-90-33-30-00-af", cn="IP222s-30-00-af", issuer="x")


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"hwid": ["IP222-30-00-af"]},
        {"hwid": ["ip222-30-00-AF"]},
        {"hwid": ["IP222s-30-00-af"]},       # the device's own broken name, fixed the same way
        {"sn": ["0090333000AF"]},
        {"sn": ["00-90-33-30-00-af"]},
        {"mac": ["00:90:33:30:00:af"]},
        {"hwid": [""], "sn": [""]},           # placeholders left empty name nothing
    ],
)
def test_a_query_naming_the_device_itself_passes(query):
    assert query_names_other_device(PHONE, query) is None


@pytest.mark.parametrize(
    "query",
    [
        {"hwid": ["IP222-30-00-b0"]},
        {"hwid": ["IP232-30-00-af"]},
        {"sn": ["0090333000b0"]},
        {"mac": ["00-90-33-30-00-b0"]},
        {"hwid": ["IP222-30-00-af", "IP222-30-00-b0"]},   # a second value is checked too
        {"hwid": ["garbage"]},
    ],
)
def test_a_query_naming_another_device_is_a_mismatch(query):
    assert query_names_other_device(PHONE, query) is not None
