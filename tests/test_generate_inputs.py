"""Which frames of a user's reference video `generate` conditions on (fast; the CLI runs in test_generate)."""

import numpy as np

from avatarforge.stages.generate import reference_indices


def test_a_long_reference_is_read_whole_up_to_the_limit_in_encodable_lengths():
    # 20 s at 25 fps, every 4th frame, up to 16 s (100 frames 4 apart): 97 = 1 + 4 * 24 frames
    idx = reference_indices(500, 4, 9, 100, 4)
    assert len(idx) == 97 and idx[0] == 0 and np.all(np.diff(idx) == 4)
    # a 5 s video is used whole: 32 frames 4 apart available, trimmed to 29 = 1 + 4 * 7
    assert len(reference_indices(125, 4, 9, 100, 4)) == 29


def test_a_short_reference_gets_the_training_length_by_repeating_its_last_frame():
    idx = reference_indices(20, 4, 9, 100, 4)
    assert list(idx) == [0, 4, 8, 12, 16, 19, 19, 19, 19]
    assert list(reference_indices(1, 4, 9, 100, 4)) == [0] * 9
