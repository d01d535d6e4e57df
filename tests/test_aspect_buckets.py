"""Aspect-ratio buckets (core/denoising/aspect_buckets.py): the list from a pixel budget, the nearest
bucket of a photo, and batches that never mix buckets."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from qwen_identity.core.denoising.aspect_buckets import bucket_batches, bucket_list, nearest_bucket
from qwen_identity.core.errors import UserInputError


def test_bucket_list_of_512_square():
    buckets = bucket_list(512, 512)
    assert (512, 512) in buckets and len(buckets) == 9
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512
        assert w * h >= 0.85 * 512 * 512                 # about the same pixel budget
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects) and aspects[0] <= 0.55 and aspects[-1] >= 1.8   # 1:2 .. 2:1
    assert bucket_list(512, 512) == buckets              # deterministic: a resumed run finds the same


def test_nearest_bucket_follows_the_photo_shape():
    buckets = bucket_list(512, 512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    portrait, landscape = nearest_bucket(600, 900, buckets), nearest_bucket(900, 600, buckets)
    assert portrait[0] < portrait[1] and landscape[0] > landscape[1]
    assert abs(math.log(portrait[0] / portrait[1]) - math.log(600 / 900)) < 0.1
    assert nearest_bucket(178, 218, buckets)[0] < nearest_bucket(178, 218, buckets)[1]   # CelebA: portrait
    with pytest.raises(UserInputError):
        bucket_list(500, 512)
    with pytest.raises(UserInputError):
        nearest_bucket(0, 5, buckets)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([(512, 512), (416, 624), (624, 416)]), min_size=1, max_size=40),
       st.integers(1, 5), st.integers(0, 3))
def test_batches_hold_every_photo_once_and_never_mix_buckets(buckets_of_photos, batch_size, epoch):
    batches = bucket_batches(buckets_of_photos, batch_size, seed=7, epoch=epoch)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(buckets_of_photos)))
    for b in batches:
        assert 1 <= len(b) <= batch_size and len({buckets_of_photos[i] for i in b}) == 1
    assert batches == bucket_batches(buckets_of_photos, batch_size, seed=7, epoch=epoch)
