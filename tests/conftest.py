import sys

import pytest


@pytest.fixture(autouse=True)
def _library_logs_to_real_stderr():
    """diffusers/transformers bind their log handler to the sys.stderr of the moment; under pytest's
    capture that stream is closed after its test, and a later warning would print a logging error."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module._get_library_root_logger()  # creates the default handler if needed
        handler = module._default_handler
        if handler is not None:
            handler.setStream(sys.__stderr__)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide singletons after a test that built an Accelerator."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
