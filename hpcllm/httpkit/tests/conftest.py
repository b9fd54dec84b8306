from __future__ import annotations

import pytest

from hpcllm.httpkit.tests.site_ca import SiteCA, site_ca_or_skip


@pytest.fixture(scope="session")
def site_ca(tmp_path_factory) -> SiteCA:
    return site_ca_or_skip(tmp_path_factory)
