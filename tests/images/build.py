"""Builds the real test images (placeholder until the image builder lands)."""

if __name__ == "__main__":
    print("images: nothing to build yet")
