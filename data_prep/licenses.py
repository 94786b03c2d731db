"""Which licenses a photo may carry to go into the data set.

YFCC100M records carry Flickr's license name ("Attribution-NonCommercial-ShareAlike License") and
URL (http://creativecommons.org/licenses/by-nc-sa/2.0/). Both are matched, to a short code; a record
whose name and URL disagree, or that matches neither, counts as unknown and is never allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from fdf_core.errors import ConfigError


@dataclass(frozen=True)
class License:
    code: str
    name: str  # the name as it appears in YFCC100M / on Flickr
    url: str


LICENSES: dict[str, License] = {lic.code: lic for lic in [
    License("arr", "All Rights Reserved", ""),
    License("by-nc-sa", "Attribution-NonCommercial-ShareAlike License",
            "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    License("by-nc", "Attribution-NonCommercial License",
            "http://creativecommons.org/licenses/by-nc/2.0/"),
    License("by-nc-nd", "Attribution-NonCommercial-NoDerivs License",
            "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
    License("by", "Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
    License("by-sa", "Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
    License("by-nd", "Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/"),
    License("nkcr", "No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    License("usgov", "United States Government Work", "http://www.usa.gov/copyright.shtml"),
    License("cc0", "Public Domain Dedication (CC0)", "https://creativecommons.org/publicdomain/zero/1.0/"),
    License("pdm", "Public Domain Mark", "https://creativecommons.org/publicdomain/mark/1.0/"),
    # Licenses of the repositories the sample corpus photos come from (data_prep/sample): never in
    # YFCC100M, listed so that the demo corpus carries its true license through the same filter.
    License("mit", "MIT License", "https://opensource.org/licenses/MIT"),
    License("bsl-1.0", "Boost Software License 1.0", "https://www.boost.org/LICENSE_1_0.txt"),
    License("apache-2.0", "Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0"),
]}

# Everything that permits derivative works (FDF crops are derivatives): CC BY, BY-SA, BY-NC,
# BY-NC-SA, public domain, and the permissive licenses of the sample corpus. NoDerivs is excluded.
DEFAULT_ALLOWED: tuple[str, ...] = ("by", "by-sa", "by-nc", "by-nc-sa", "cc0", "pdm", "nkcr",
                                    "mit", "bsl-1.0", "apache-2.0")

_BY_NAME = {lic.name.lower(): lic.code for lic in LICENSES.values()}
_CC_CODE = r"(by(?:-nc)?(?:-sa|-nd)?)"
_CC_SHORT_NAME = re.compile(r"^cc[ -]" + _CC_CODE + r"(?:[ -]\d\.\d)?$")  # "CC BY-SA 4.0"
_CC_URL = re.compile(r"^creativecommons\.org/licenses/" + _CC_CODE + r"(?:/|$)")


def _normalize_url(url: str) -> str:
    url = url.strip().lower()
    url = re.sub(r"^https?://", "", url)
    return re.sub(r"^www\.", "", url).rstrip("/")


def code_from_name(name: str) -> str | None:
    name = " ".join(name.split()).lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    m = _CC_SHORT_NAME.match(name)
    return m.group(1) if m else None


def code_from_url(url: str) -> str | None:
    url = _normalize_url(url)
    if not url:
        return None
    if m := _CC_URL.match(url):
        return m.group(1)
    if url.startswith("creativecommons.org/publicdomain/zero/"):
        return "cc0"
    if url.startswith("creativecommons.org/publicdomain/mark/"):
        return "pdm"
    for lic in LICENSES.values():
        if lic.url and _normalize_url(lic.url) == url:
            return lic.code
    return None


def license_code(name: str, url: str) -> str | None:
    """The short code of a record's license, or None when unknown or when name and URL disagree."""
    codes = {c for c in (code_from_name(name or ""), code_from_url(url or "")) if c is not None}
    return codes.pop() if len(codes) == 1 else None


def allowed_codes(spec: Iterable[str]) -> frozenset[str]:
    """Codes from a config list that may hold codes, YFCC names or URLs; unknown entries are errors."""
    codes = set()
    for item in spec:
        code = item.lower() if item.lower() in LICENSES else license_code(item, "") or code_from_url(item)
        if code is None:
            raise ConfigError(f"--allowed_licenses: unknown license {item!r}; known codes: "
                             + ", ".join(LICENSES))
        codes.add(code)
    return frozenset(codes)
