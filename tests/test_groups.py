"""Groups of models: a template level between model and default, and `device.groups` in templates."""

import logging

import pytest
from driving import call, terminator_headers

GROUPS = {"phones": ["IP232", "IP222"], "new-ui": ["IP232"], "gateways": ["IP1202"]}


def script(app, cert) -> str:
    answer = call(app, "/", terminator_headers(cert))
    assert answer.status == 200, answer.text
    return answer.text.split("\r\n")[0]


@pytest.fixture
def app(site):
    site.write("templates/default.j2", "default for {{ device.hwid }} {{ device.groups | join(',') or 'no groups' }}\n")
    site.write("templates/groups/phones.j2", "phones: {{ device.hwid }} in {{ device.groups | join(',') }}\n")
    site.write("templates/groups/new-ui.j2", "new UI\n")
    return site.app(groups=GROUPS, apply_once=False)


def test_a_group_template_serves_the_models_of_the_group(app, pki):
    assert script(app, pki.phone) == "phones: IP232-30-00-af in phones,new-ui"
    assert script(app, pki.broken) == "phones: IP222-30-00-b0 in phones"    # an IP222s certificate is an IP222


def test_the_first_group_in_the_tables_order_wins(site, pki):
    site.write("templates/groups/phones.j2", "phones\n")
    site.write("templates/groups/new-ui.j2", "new UI\n")
    assert script(site.app(groups={"new-ui": ["IP232"], "phones": ["IP232"]}, apply_once=False), pki.phone) == "new UI"
    assert script(site.app(groups={"phones": ["IP232"], "new-ui": ["IP232"]}, apply_once=False), pki.phone) == "phones"


def test_a_model_or_device_template_beats_the_group(app, site, pki):
    site.write("templates/models/IP232.j2", "model\n")
    app.store.refresh()
    assert script(app, pki.phone) == "model"
    site.write("templates/devices/00-90-33-30-00-af.j2", "device\n")
    app.store.refresh()
    assert script(app, pki.phone) == "device"


def test_a_group_without_a_template_falls_through_to_the_default(app, pki):
    assert script(app, pki.gateway) == "default for IP1202-35-fe-4d gateways"


def test_a_model_in_no_group_has_no_groups(site, pki):
    site.write("templates/default.j2", "{{ device.groups | length }} {{ 'phones' in device.groups }}\n")
    assert script(site.app(apply_once=False), pki.phone) == "0 False"


def test_groups_may_come_from_vars_default_toml_after_the_settings(site, pki):
    site.write("vars/default.toml", '[groups]\nphones = ["ip232"]\ngateways = ["IP1202"]\nnew-ui = ["IP232"]\n')
    site.write("templates/default.j2", "{{ device.groups | join(',') }}\n")
    app = site.app(groups={"new-ui": ["IP222"]}, apply_once=False)
    assert script(app, pki.phone) == "new-ui,phones"          # the settings' groups first, models of both
    assert script(app, pki.gateway) == "gateways"
    assert script(app, pki.broken) == "new-ui"


def test_group_file_names_are_matched_without_regard_to_case(site, pki):
    site.write("templates/groups/Phones.j2", "phones\n")
    assert script(site.app(groups={"PHONES": ["IP232"]}, apply_once=False), pki.phone) == "phones"


def test_a_malformed_groups_table_is_a_configuration_error(site, pki, caplog):
    site.write("vars/default.toml", 'groups = ["IP232"]\n')
    site.write("templates/default.j2", "x\n")
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.status == 500
    assert "groups must be a table" in caplog.records[-1].fields["detail"]
