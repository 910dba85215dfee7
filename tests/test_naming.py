"""Tests for asyncvid.video.naming: prompt files, slugs, and output paths that stay inside the output folder."""

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvid.errors import UsageError
from asyncvid.video.naming import FORMATS, output_path, output_stem, read_prompts, sidecar_path, slugify

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def write(tmp_path, data, name="prompts.txt"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_read_prompts_skips_blanks_and_comments_and_keeps_inner_hashes(tmp_path):
    text = "# header\n\n  a cat surfing  \n   # indented comment\r\nthe #1 hit record # not a comment\n\t\n"
    assert read_prompts(write(tmp_path, text)) == ["a cat surfing", "the #1 hit record # not a comment"]


def test_read_prompts_handles_bom_crlf_and_no_final_newline(tmp_path):
    assert read_prompts(write(tmp_path, b"\xef\xbb\xbfcaf\xc3\xa9\r\nsecond")) == ["café", "second"]


def test_read_prompts_does_not_split_on_unicode_line_separators(tmp_path):
    assert read_prompts(write(tmp_path, "a\u2028b\x0cc\n")) == ["a\u2028b\x0cc"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"prompt file '.*missing\.txt' does not exist; pass a text file with one prompt per line"),
        ("dir", r"'.*dir' is a folder; pass a text file"),
        (b"\x00\xff\xfe", r"looks binary \(it contains NUL bytes\); save it as UTF-8"),
        ("caf\u00e9\n".encode("latin-1"), r"is not UTF-8 \(bad byte 0xe9 at offset 3\); save it as UTF-8"),
        (b"", r"has no prompts"),
        (b"# only\n  # comments\n\n   \n", r"has no prompts \(only blank lines or # comments\)"),
    ],
)
def test_read_prompts_errors_are_one_line_and_name_the_path(tmp_path, content, match):
    if content is None:
        path = tmp_path / "missing.txt"
    elif content == "dir":
        path = tmp_path / "dir"
        path.mkdir()
    else:
        path = write(tmp_path, content)
    with pytest.raises(UsageError, match=match) as info:
        read_prompts(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_read_prompts_unreadable_file(tmp_path):
    path = write(tmp_path, "a prompt\n")
    path.chmod(0)
    try:
        with pytest.raises(UsageError, match="not readable \\(permission denied\\)"):
            read_prompts(path)
    finally:
        path.chmod(0o644)


def test_read_prompts_permission_error_even_as_root(tmp_path, monkeypatch):
    path = write(tmp_path, "a prompt\n")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", deny)
    with pytest.raises(UsageError, match=r"'.*prompts\.txt' is not readable \(permission denied\); chmod u\+r"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("A Cat, Surfing!", "a-cat-surfing"),
        ("Crème brûlée à Paris", "creme-brulee-a-paris"),
        ("../../etc/passwd", "etc-passwd"),
        ("...", "video"),
        ("", "video"),
        ("日本語", "video"),
        ("--x--", "x"),
        ("ﬁne ①", "fine-1"),  # NFKD folds ligatures and circled digits
    ],
)
def test_slugify_examples(text, slug):
    assert slugify(text) == slug


def test_slugify_truncates_at_a_word_boundary():
    assert slugify("alpha beta gamma", max_len=12) == "alpha-beta"
    assert slugify("alpha beta gamma", max_len=10) == "alpha-beta"  # the cut falls on a '-'
    assert slugify("abcdefghijklmnop", max_len=5) == "abcde"  # one long word: hard cut
    assert slugify("", max_len=3) == "vid"
    with pytest.raises(ValueError, match="max_len must be >= 1 but is 0"):
        slugify("x", max_len=0)


def test_output_stem_and_paths(tmp_path):
    assert output_stem(7, "A cat") == "007-a-cat"
    assert output_stem(1234, "x") == "1234-x"
    assert output_path(tmp_path, "007-a-cat", "mp4") == tmp_path.resolve() / "007-a-cat.mp4"
    assert output_path(tmp_path, "007-a-cat", "png") == tmp_path.resolve() / "007-a-cat"
    assert sidecar_path(tmp_path / "007-a-cat.mp4") == tmp_path / "007-a-cat.json"
    assert sidecar_path(tmp_path / "007-a-cat.gif") == tmp_path / "007-a-cat.json"
    assert sidecar_path(tmp_path / "007-a-cat") == tmp_path / "007-a-cat.json"
    with pytest.raises(ValueError, match="index must be >= 0 but is -1"):
        output_stem(-1, "x")


@pytest.mark.parametrize("stem", ["..", ".", "", "a/b", "../escape", "a\x00b"])
def test_output_path_refuses_names_that_leave_the_folder(tmp_path, stem):
    with pytest.raises(UsageError, match="not a plain file name"):
        output_path(tmp_path, stem, "png")


def test_output_path_refuses_a_symlink_out_of_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "000-x.mp4").symlink_to(tmp_path / "elsewhere.mp4")
    with pytest.raises(UsageError, match="resolves outside"):
        output_path(tmp_path / "out", "000-x", "mp4")


def test_output_path_refuses_unknown_formats(tmp_path):
    with pytest.raises(UsageError, match="unknown output format 'avi'; use one of mp4, gif, png"):
        output_path(tmp_path, "000-x", "avi")


@settings(max_examples=200, deadline=None)
@given(text=st.text(), max_len=st.integers(1, 80), index=st.integers(0, 5000), fmt=st.sampled_from(FORMATS))
def test_slugs_and_paths_are_always_safe(tmp_path_factory, text, max_len, index, fmt):
    slug = slugify(text, max_len=max_len)
    assert SLUG.match(slug) and len(slug) <= max_len
    out_dir = tmp_path_factory.getbasetemp()
    path = output_path(out_dir, output_stem(index, text), fmt)
    assert path.parent == out_dir.resolve()


@settings(max_examples=200, deadline=None)
@given(text=st.text(), indices=st.lists(st.integers(0, 100_000), min_size=2, max_size=20, unique=True))
def test_stems_are_unique_for_distinct_indices(text, indices):
    stems = [output_stem(i, text) for i in indices]
    assert len(set(stems)) == len(stems)


# Any single line a text editor could save: no line ends, no NUL, no lone surrogates (not encodable as UTF-8).
line_chars = st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",))
prompt_lines = st.text(line_chars, min_size=1).filter(lambda s: s.strip() and not s.strip().startswith("#"))


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(prompt_lines, min_size=1, max_size=10))
def test_read_prompts_round_trips_any_single_line_prompts(tmp_path_factory, prompts):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert read_prompts(path) == [p.strip() for p in prompts]


# --- properties: any bytes in, prompts or one refusal out; names that never escape or collide --------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_read_prompts_on_any_bytes_returns_clean_prompts_or_one_usage_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("any") / "prompts.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompts(path)
    except UsageError as err:  # never another exception: a bad file is the user's to fix
        message = str(err)
        assert "\n" not in message and str(path) in message
        return
    assert prompts
    for prompt in prompts:
        assert prompt == prompt.strip() and prompt and not prompt.startswith("#")
        assert "\n" not in prompt and "\r" not in prompt and "\x00" not in prompt


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(st.text(max_size=300), min_size=1, max_size=30), fmt=st.sampled_from(FORMATS))
def test_outputs_and_sidecars_of_a_batch_never_collide(tmp_path_factory, prompts, fmt):
    # Same-text prompts, prompts that slug alike ("A cat!" / "a cat?") and empty slugs all get distinct names,
    # also on case-insensitive file systems, and no sidecar is another video's name.
    out = tmp_path_factory.getbasetemp()
    targets = [output_path(out, output_stem(i, p), fmt) for i, p in enumerate(prompts)]
    names = [t.name for t in targets] + [sidecar_path(t).name for t in targets]
    assert len({n.lower() for n in names}) == 2 * len(prompts)
    for target in targets:
        assert target.parent == out.resolve() and sidecar_path(target).parent == out.resolve()
        assert len(sidecar_path(target).name.encode()) <= 255  # the usual file-name limit


@settings(max_examples=300, deadline=None)
@given(stem=st.text(max_size=60), fmt=st.sampled_from(FORMATS))
def test_output_path_of_any_stem_stays_directly_inside_the_folder_or_is_refused(tmp_path_factory, stem, fmt):
    out = tmp_path_factory.getbasetemp()
    try:
        path = output_path(out, stem, fmt)
    except UsageError:
        return
    assert path.parent == out.resolve()
    assert path.resolve().parent == out.resolve()
