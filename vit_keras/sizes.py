"""Image sizes: where an `image_size` argument (int or (height, width)) becomes a `(height, width)` pair.

A leaf module (no imports from the package), so that every level of it, from
`presets` to `serving`, normalises sizes with the same function and the same
one-line error. Public as `vit_keras.data.height_width` too.
"""

import numbers


def is_int(value):
    """Whether `value` is an integer (Python or NumPy), and not a bool: the package's one test of a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def height_width(image_size, name="image_size"):
    """`(height, width)` as Python ints of a size given as one int or a pair of them.

    An int `n` (a Python or NumPy integer) is the square `(n, n)`; a tuple, list
    or 1-D array of two ints is `(height, width)`, of one int the square. Every
    side must be positive. Anything else (None, a bool, a float, a string, three
    numbers) is a ValueError that names the argument and shows the value.

    Args:
        image_size: int or (height, width). The size.
        name: str. The argument's name in the error. Defaults to "image_size".

    Example:
    >>> height_width(224)
    (224, 224)
    >>> height_width([384, 512])
    (384, 512)
    """
    if is_int(image_size):
        sides = (image_size,)
    elif isinstance(image_size, (tuple, list)) or getattr(image_size, "ndim", None) == 1:  # a NumPy array
        sides = tuple(image_size)
    else:
        sides = ()
    if len(sides) not in (1, 2) or not all(is_int(v) and v > 0 for v in sides):
        raise ValueError(f"{name} must be a positive integer or a (height, width) pair of them, "
                         f"got {image_size!r}.")
    return (int(sides[0]), int(sides[-1]))


def parse(text):
    """A size typed on a command line: `384` is 384, `384x512` (or `384,512`) is (384, 512).

    Only the syntax: whether the numbers make a size is `height_width`'s (or `is_size`'s) to say.

    Example:
    >>> parse("384x512")
    (384, 512)
    """
    try:
        sides = [int(p) for p in str(text).lower().replace("x", ",").split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):  # the values are checked by `height_width`
        raise ValueError(f"must be a size in pixels, or HEIGHTxWIDTH of them (384, 384x512), got {text!r}")
    return sides[0] if len(sides) == 1 else tuple(sides)


def is_size(value):
    """Whether `height_width` takes `value`."""
    try:
        height_width(value)
    except ValueError:
        return False
    return True
