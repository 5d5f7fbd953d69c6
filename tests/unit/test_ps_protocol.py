"""The parameter server's wire format: a message's header read back by name after its bytes
travelled, its body after the header, and tags bounded by what the MPI library allows."""

import numpy as np
import pytest
import torch

from hvdllm.errors import UserError
from hvdllm.parallel.ps_protocol import (MAX_TAG, PUSH_HEADER, Kind, body_view, check_tag_bound, encode, header_view,
                                         reply_header)


def test_a_push_reads_back_by_field_name_with_its_gradient_after_the_header():
    header = np.zeros(1, dtype=PUSH_HEADER)[0]
    header["clock"], header["loss"], header["samples"] = 4097, 2.5, 8.0
    message = torch.from_numpy(encode(header, torch.arange(3, dtype=torch.float32)))
    received = header_view(message, PUSH_HEADER)
    assert (received["clock"], received["loss"], received["samples"]) == (4097, 2.5, 8.0)
    assert body_view(message, PUSH_HEADER).tolist() == [0.0, 1.0, 2.0]


def test_the_reply_header_holds_one_staleness_bin_per_clock_of_lag():
    assert reply_header(2)["hist"].shape == (3,)
    assert reply_header(2).itemsize % 4 == 0  # the float32 parameters after it stay aligned


def test_tags_are_the_kinds_whatever_the_clock_and_a_library_below_them_is_one_line():
    assert MAX_TAG == max(Kind) < 32767
    check_tag_bound(32767)
    with pytest.raises(UserError, match=f"needs MPI tags up to {MAX_TAG}; this MPI's MPI_TAG_UB is 5"):
        check_tag_bound(5)
