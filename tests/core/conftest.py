import pytest

from tests.core.cases import CASE_IDS, CASES, make_problem


@pytest.fixture(params=CASES, ids=CASE_IDS)
def problem(request):
    return make_problem(request.param)
