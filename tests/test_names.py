"""Distinguished names in the three forms terminators forward, compared as attribute sequences."""

import pytest

from configserver.lab.pki import device_name, innovaphone_ca_name
from configserver.names import DistinguishedName, DNError, parse_dn

PHONE = (("C", "DE"),), (("O", "innovaphone"),), (("CN", "IP1202-35-fe-4d"),)
CA1 = (("C", "DE"),), (("O", "innovaphone"),), (("OU", "innovaphone Device Certification Authority"),)


@pytest.mark.parametrize(
    "text, rdns",
    [
        ("/C=DE/O=innovaphone/CN=IP1202-35-fe-4d", PHONE),                        # HAProxy, Apache legacy
        ("CN=IP1202-35-fe-4d,O=innovaphone,C=DE", PHONE),                         # Apache, nginx
        ("C = DE, O = innovaphone, CN = IP1202-35-fe-4d", PHONE),                 # lighttpd
        ("/C=DE/O=innovaphone/OU=innovaphone Device Certification Authority", CA1),
        ("OU=innovaphone Device Certification Authority,O=innovaphone,C=DE", CA1),
        ("C = DE, O = innovaphone, OU = innovaphone Device Certification Authority", CA1),
        ("cn=IP1202-35-fe-4d,o=innovaphone,c=DE", PHONE),                         # types are case-insensitive
        ("2.5.4.3=IP1202-35-fe-4d,2.5.4.10=innovaphone,2.5.4.6=DE", PHONE),       # dotted OIDs
        ("commonName=IP1202-35-fe-4d,organizationName=innovaphone,countryName=DE", PHONE),
    ],
)
def test_every_terminator_form_parses_to_the_same_name(text, rdns):
    assert parse_dn(text).rdns == rdns


@pytest.mark.parametrize(
    "text, value",
    [
        (r"CN=Acme\, Inc.,C=DE", "Acme, Inc."),
        (r"CN=a\+b,C=DE", "a+b"),
        (r"CN=M\C3\BCller,C=DE", "Müller"),                # RFC 4514 hex escapes of UTF-8
        (r"CN=\#hash\ ,C=DE", "#hash "),
        ('C = DE, CN = "Acme, Inc."', "Acme, Inc."),       # oneline quotes instead of escaping
        (r"/C=DE/CN=M\xC3\xBCller", "Müller"),             # legacy \xHH escapes
        ("/C=DE/CN=a/b", "a/b"),                           # '/' in a legacy value
    ],
)
def test_escaped_values_are_unescaped(text, value):
    assert parse_dn(text).values("CN") == [value]


def test_multi_valued_rdn_is_one_rdn_in_every_form():
    a = parse_dn("CN=x+OU=y,C=DE")
    b = parse_dn("C = DE, CN = x + OU = y")
    assert a == b
    assert len(a.rdns) == 2


def test_order_matters():
    assert parse_dn("/C=DE/O=innovaphone/CN=x") != parse_dn("/CN=x/O=innovaphone/C=DE")


def test_parsed_strings_equal_the_certificate_names():
    assert parse_dn("CN=IP1202-35-fe-4d,O=innovaphone,C=DE") == DistinguishedName.from_x509(device_name("IP1202-35-fe-4d"))
    assert parse_dn("/C=DE/O=innovaphone/OU=innovaphone Device Certification Authority") == DistinguishedName.from_x509(
        innovaphone_ca_name(1)
    )
    assert str(DistinguishedName.from_x509(device_name("IP1202-35-fe-4d"))) == "CN=IP1202-35-fe-4d,O=innovaphone,C=DE"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "no equals sign", "CN=x,", "CN=x\nO=y", "1CN=x", "CN=trailing\\", 'C = DE, CN = "open', "CN=\\C3(,C=DE"],
)
def test_malformed_names_are_refused(text):
    with pytest.raises(DNError):
        parse_dn(text)
