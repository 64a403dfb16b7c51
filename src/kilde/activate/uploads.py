"""Customer lists sent to the ad platforms themselves, where credentials are given.

- Meta Custom Audiences (Marketing API): `POST {api}/{audience_id}/users` adds people and
  `DELETE` on the same path removes them; the body is `{"payload": {"schema": [...], "data":
  [[...], ...]}}` with the hashed columns EMAIL, PHONE, FN, LN, COUNTRY, at most 10,000 rows a
  request.
- Google Ads Customer Match (Google Ads API, REST): an offline user data job of type
  CUSTOMER_MATCH_USER_LIST is created for the user list (with the consent signals: everyone
  sent consented to advertising), `create` and `remove` operations of hashed user identifiers
  are added to it, and the job is run. A full sync starts with `removeAll`, so the list becomes
  exactly the segment.

Only hashes leave Kilde. A failure never loses anything: the caller keeps the previous sync
state, so the next sync sends the same difference again. Errors name the platform's answer (its
status, error type and message) and never a value that was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from kilde.activate.webhooks import RETRYABLE_STATUS, transport_error
from kilde.plan.destinations import GOOGLE_ADS_API, META_API, Destination, Upload

META_SCHEMA = ["EMAIL", "PHONE", "FN", "LN", "COUNTRY"]
META_BATCH = 10_000
GOOGLE_BATCH = 10_000  # operations per addOperations request
ATTEMPTS = 3  # per request; the next scheduled sync tries again after that


class UploadError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class UploadResult:
    requests: int = 0
    sent_added: int = 0
    sent_removed: int = 0
    last_status: int | None = None


def _chunks(rows: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _platform_reason(response: httpx.Response) -> str:
    """The platform's own words (type, code, message), shortened; bodies hold no values."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ""
    parts = [str(error[k]) for k in ("type", "status", "code") if error.get(k) is not None]
    message = str(error.get("message") or "")[:200]
    return f" ({' '.join(parts)}: {message})" if parts or message else ""


def _request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    json: Any,
    headers: dict[str, str],
    platform: str,
    result: UploadResult,
) -> dict[str, Any]:
    """One request with retries where retrying can help (no answer, 5xx, 408, 429)."""
    last: UploadError | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(2.0 ** (attempt - 1))  # 1 s, 2 s
        try:
            response = client.request(method, url, json=json, headers=headers)
        except httpx.HTTPError as exc:
            last = UploadError(f"{platform}: {transport_error(exc, client.timeout.read or 0)}")
            continue
        result.requests += 1
        result.last_status = response.status_code
        if response.is_success:
            try:
                body = response.json()
            except ValueError:
                body = {}
            return body if isinstance(body, dict) else {}
        reason = _platform_reason(response)
        code = response.status_code
        if code in (401, 403) or "OAuthException" in reason:
            raise UploadError(
                f"{platform}: HTTP {code}{reason}: the platform refused the credentials; "
                "check upload.access_token (and the developer token or account ids)",
                code,
            )
        if code < 500 and code not in RETRYABLE_STATUS:
            raise UploadError(
                f"{platform}: HTTP {code}{reason}: the platform rejected the upload", code
            )
        last = UploadError(f"{platform}: HTTP {code}{reason}: the platform failed", code)
    assert last is not None
    raise last


def meta_upload(
    destination: Destination, added: list[list[str]], removed: list[list[str]]
) -> UploadResult:
    upload = destination.upload
    assert upload is not None and upload.audience_id
    api = (upload.api_url or META_API).rstrip("/")
    url = f"{api}/{upload.audience_id}/users"
    headers = {"Authorization": f"Bearer {upload.access_token}"}
    result = UploadResult()
    with httpx.Client(timeout=upload.timeout) as client:
        for method, rows in (("POST", added), ("DELETE", removed)):
            for chunk in _chunks(rows, META_BATCH):
                body = {"payload": {"schema": META_SCHEMA, "data": chunk}}
                _request(
                    client,
                    method,
                    url,
                    json=body,
                    headers=headers,
                    platform="Meta",
                    result=result,
                )
                if method == "POST":
                    result.sent_added += len(chunk)
                else:
                    result.sent_removed += len(chunk)
    return result


def google_identifiers(row: dict[str, str]) -> list[dict[str, Any]]:
    """A Customer Match file row as the API's user identifiers (hashes; country, zip in clear)."""
    found: list[dict[str, Any]] = []
    if row["Email"]:
        found.append({"hashedEmail": row["Email"]})
    if row["Phone"]:
        found.append({"hashedPhoneNumber": row["Phone"]})
    if row["First Name"] and row["Last Name"] and row["Country"] and row["Zip"]:
        found.append(
            {
                "addressInfo": {
                    "hashedFirstName": row["First Name"],
                    "hashedLastName": row["Last Name"],
                    "countryCode": row["Country"],
                    "postalCode": row["Zip"],
                }
            }
        )
    return found


def _google_headers(upload: Upload) -> dict[str, str]:
    assert upload.developer_token
    headers = {
        "Authorization": f"Bearer {upload.access_token}",
        "developer-token": upload.developer_token,
    }
    if upload.login_customer_id:
        headers["login-customer-id"] = upload.login_customer_id.replace("-", "")
    return headers


def google_upload(
    destination: Destination,
    added: list[dict[str, str]],
    removed: list[dict[str, str]],
    *,
    full: bool,
) -> UploadResult:
    upload = destination.upload
    assert upload is not None and upload.customer_id and upload.user_list_id
    api = (upload.api_url or GOOGLE_ADS_API).rstrip("/")
    customer = upload.customer_id.replace("-", "")
    headers = _google_headers(upload)
    operations: list[dict[str, Any]] = [{"removeAll": True}] if full else []
    for kind, rows in (("create", added), ("remove", removed)):
        for row in rows:
            identifiers = google_identifiers(row)
            if identifiers:
                operations.append({kind: {"userIdentifiers": identifiers}})
    result = UploadResult()
    if not operations:
        return result
    with httpx.Client(timeout=upload.timeout) as client:
        job = {
            "job": {
                "type": "CUSTOMER_MATCH_USER_LIST",
                "customerMatchUserListMetadata": {
                    "userList": f"customers/{customer}/userLists/{upload.user_list_id}",
                    # Everyone in the list consented to the advertising purpose.
                    "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
                },
            }
        }
        created = _request(
            client,
            "POST",
            f"{api}/customers/{customer}/offlineUserDataJobs:create",
            json=job,
            headers=headers,
            platform="Google Ads",
            result=result,
        )
        name = created.get("resourceName")
        if not isinstance(name, str) or not name.startswith(f"customers/{customer}/"):
            raise UploadError("Google Ads: the job was created without a resource name")
        for chunk in _chunks(operations, GOOGLE_BATCH):
            _request(
                client,
                "POST",
                f"{api}/{name}:addOperations",
                json={"operations": chunk, "enablePartialFailure": True},
                headers=headers,
                platform="Google Ads",
                result=result,
            )
        _request(
            client,
            "POST",
            f"{api}/{name}:run",
            json={},
            headers=headers,
            platform="Google Ads",
            result=result,
        )
    result.sent_added, result.sent_removed = len(added), len(removed)
    return result
