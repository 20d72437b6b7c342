from edge_infer.tools.photos import list_photos, photo_label

LABELS = ("tench", "goldfish", "great white shark")


def test_labels_come_from_foolbox_names_or_class_folders(tmp_path):
    root = tmp_path
    assert photo_label(root / "imagenet_00_2.jpg", root, LABELS) == 2
    assert photo_label(root / "imagenet_00_7.jpg", root, LABELS) is None        # no such class
    assert photo_label(root / "Goldfish" / "a.jpg", root, LABELS) == 1          # folder named after a label
    assert photo_label(root / "0" / "a.jpg", root, LABELS) == 0                 # or its index
    assert photo_label(root / "holiday.jpg", root, LABELS) is None
    assert photo_label(root / "cats" / "a.jpg", root, LABELS) is None


def test_listing_finds_photos_one_level_down_and_nothing_else(tmp_path):
    for rel in ("imagenet_01_1.jpg", "tench/x.JPG", "tench/notes.txt", "b.png", "deep/er/y.jpg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    got = [(str(p.path.relative_to(tmp_path)), p.label) for p in list_photos(tmp_path, LABELS)]
    assert got == [("b.png", None), ("imagenet_01_1.jpg", 1), ("tench/x.JPG", 0)]
    assert [p.path.name for p in list_photos(tmp_path, LABELS, foolbox_only=True)] == ["imagenet_01_1.jpg"]


def test_a_photo_stream_cycles_a_folder_and_says_when_it_is_empty(tmp_path):
    import pytest

    from edge_infer.tools.photos import photo_stream
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in photo_stream(tmp_path, LABELS, 5)] == ["a.jpg", "b.png", "a.jpg", "b.png", "a.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no photos in"):
        photo_stream(tmp_path / "empty", LABELS, 3)
