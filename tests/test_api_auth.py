"""Each ACS3-HMAC-SHA256 failure is answered with ECS's code and status and
reaches no control plane: nothing changed. Requests are signed by the SDK's own
signing code, then one thing is broken."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import Running, running_server, send, signed_request

QUERY = {
    "RegionId": "cn-hangzhou",
    "SecurityGroupId": "sg-web",
    "Permissions.1.IpProtocol": "TCP",
    "Permissions.1.PortRange": "22/22",
    "Permissions.1.SourceCidrIp": "0.0.0.0/0",
}
ACTION = "AuthorizeSecurityGroup"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Running]:
    with running_server(tmp_path) as running:
        yield running


def _rejected(
    api: Running,
    status: int,
    code: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
    method: str = "POST",
) -> dict[str, Any]:
    got_status, answer = send(api.endpoint, method, path, headers, body)
    assert (got_status, answer["Code"]) == (status, code), answer
    assert answer["RequestId"] and answer["Message"]
    assert api.control_plane.calls == []  # nothing reached the control plane
    assert api.control_plane.groups["sg-web"]["Permissions"] == []
    return answer


def test_a_correctly_signed_raw_request_is_accepted(api: Running) -> None:
    path, headers, body = signed_request(api.endpoint, api.key, ACTION, QUERY)
    status, answer = send(api.endpoint, "POST", path, headers, body)
    assert status == 200, answer
    assert api.control_plane.calls[0][1]["Permissions"][0]["PortRange"] == "22/22"


def test_missing_authorization_is_incomplete_signature(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    del headers["Authorization"]
    _rejected(api, 400, "IncompleteSignature", path, headers)


@pytest.mark.parametrize(
    "header", ["x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256", "x-acs-action"]
)
def test_missing_signed_header_is_incomplete_signature(api: Running, header: str) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    del headers[header]
    _rejected(api, 400, "IncompleteSignature", path, headers)


@pytest.mark.parametrize(
    "authorization",
    [
        "garbage",
        "ACS3-HMAC-SHA256 Credential=LTAIx,Signature=" + "0" * 64,
        "ACS3-HMAC-SHA256 Credential=LTAIx,SignedHeaders=host,Signature=abc",
        "ACS3-HMAC-SM3 Credential=LTAIx,SignedHeaders=host,Signature=" + "0" * 64,
    ],
)
def test_malformed_authorization_is_incomplete_signature(api: Running, authorization: str) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    headers["Authorization"] = authorization
    _rejected(api, 400, "IncompleteSignature", path, headers)


def test_unsigned_x_acs_header_is_incomplete_signature(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    headers["x-acs-extra"] = "smuggled"
    _rejected(api, 400, "IncompleteSignature", path, headers)


def test_unknown_access_key_is_invalid_access_key_id_not_found(api: Running) -> None:
    forged = type(api.key)("LTAI" + "x" * 20, api.key.access_key_secret, "")
    path, headers, _ = signed_request(api.endpoint, forged, ACTION, QUERY)
    _rejected(api, 404, "InvalidAccessKeyId.NotFound", path, headers)


def test_deleted_key_stops_working_at_once(api: Running) -> None:
    api.keystore.delete(api.key.access_key_id)
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    _rejected(api, 404, "InvalidAccessKeyId.NotFound", path, headers)


def test_wrong_secret_is_signature_does_not_match(api: Running) -> None:
    wrong = type(api.key)(api.key.access_key_id, "not-the-secret", "")
    path, headers, _ = signed_request(api.endpoint, wrong, ACTION, QUERY)
    _rejected(api, 400, "SignatureDoesNotMatch", path, headers)


def test_tampered_parameter_is_signature_does_not_match(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    _rejected(api, 400, "SignatureDoesNotMatch", path.replace("22%2F22", "1%2F65535"), headers)


def test_tampered_body_is_signature_does_not_match(api: Running) -> None:
    form = b"Description=x"
    path, headers, _ = signed_request(
        api.endpoint,
        api.key,
        ACTION,
        QUERY,
        body=form,
        content_type="application/x-www-form-urlencoded",
    )
    _rejected(api, 400, "SignatureDoesNotMatch", path, headers, b"Description=y")


def test_tampered_action_header_is_signature_does_not_match(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    headers["x-acs-action"] = "RevokeSecurityGroup"
    _rejected(api, 400, "SignatureDoesNotMatch", path, headers)


@pytest.mark.parametrize("offset", [-16 * 60, 16 * 60])
def test_date_outside_15_minutes_is_invalid_timestamp_expired(api: Running, offset: int) -> None:
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY, date=date)
    _rejected(api, 400, "InvalidTimeStamp.Expired", path, headers)


def test_malformed_date_is_invalid_timestamp_format(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY, date="yesterday")
    _rejected(api, 400, "InvalidTimeStamp.Format", path, headers)


def test_replayed_nonce_is_signature_nonce_used_and_applies_once(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    assert send(api.endpoint, "POST", path, headers)[0] == 200
    status, answer = send(api.endpoint, "POST", path, headers)
    assert (status, answer["Code"]) == (400, "SignatureNonceUsed")
    assert len(api.control_plane.calls) == 1  # the replay changed nothing


def test_a_rejected_request_does_not_burn_its_nonce(api: Running) -> None:
    nonce = "nonce-under-test"
    wrong = type(api.key)(api.key.access_key_id, "not-the-secret", "")
    path, headers, _ = signed_request(api.endpoint, wrong, ACTION, QUERY, nonce=nonce)
    _rejected(api, 400, "SignatureDoesNotMatch", path, headers)
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY, nonce=nonce)
    assert send(api.endpoint, "POST", path, headers)[0] == 200


def test_unknown_action_when_signed_is_404_and_reaches_nothing(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, "DeleteEverything", {})
    _rejected(api, 404, "InvalidAction.NotFound", path, headers)


def test_wrong_version_is_invalid_version(api: Running) -> None:
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    headers["x-acs-version"] = "2016-03-14"  # signed as 2014-05-26: re-sign with the new value
    from alibabacloud_tea_openapi.utils import Utils
    from darabonba.request import DaraRequest

    request = DaraRequest()
    request.method, request.pathname, request.query = "POST", "/", QUERY
    request.headers = {k: v for k, v in headers.items() if k != "Authorization"}
    headers["Authorization"] = Utils.get_authorization(
        request,
        "ACS3-HMAC-SHA256",
        headers["x-acs-content-sha256"],
        api.key.access_key_id,
        api.key.access_key_secret,
    )
    _rejected(api, 400, "InvalidVersion", path, headers)


def test_list_parameter_with_a_hole_is_invalid_parameter(api: Running) -> None:
    query = {
        "RegionId": "r",
        "NetworkInterfaceId": "eni-1",
        "SecurityGroupId.1": "sg-a",
        "SecurityGroupId.3": "sg-b",
    }
    path, headers, _ = signed_request(
        api.endpoint, api.key, "ModifyNetworkInterfaceAttribute", query
    )
    answer = _rejected(api, 400, "InvalidParameter", path, headers)
    assert "SecurityGroupId.2" in answer["Message"]


def test_secrets_and_signatures_never_reach_the_log(
    api: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    path, headers, _ = signed_request(api.endpoint, api.key, ACTION, QUERY)
    send(api.endpoint, "POST", path, headers)
    wrong = type(api.key)(api.key.access_key_id, "not-the-secret", "")
    path, bad_headers, _ = signed_request(api.endpoint, wrong, ACTION, QUERY)
    send(api.endpoint, "POST", path, bad_headers)
    text = caplog.text
    assert "ECS API AuthorizeSecurityGroup" in text
    assert api.key.access_key_secret not in text
    for h in (headers, bad_headers):
        assert h["Authorization"].rsplit("Signature=", 1)[1] not in text
