"""Minimal line/scatter plots with error bars, drawn with PIL (no matplotlib)."""

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1
    return ImageFont.load_default()


def _ticks(low, high, count=5):
  """About `count` round tick values covering [low, high]."""
  if high <= low:
    high = low + 1.0
  raw = (high - low) / count
  step = 10 ** math.floor(math.log10(raw))
  step = next(s * step for s in (1, 2, 2.5, 5, 10) if s * step >= raw)
  first = math.floor(low / step) * step
  return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def plot(path, series, xlabel, ylabel, title, xticks=None, width=640, height=440, lines=True):
  """Write a PNG plot.

  Args:
    series: list of dicts with 'label', 'x', 'y' and optional 'yerr' and
      'xerr' (lists of floats) and 'point_labels' (text beside each point).
    xticks: optional list of (value, text) for the x axis (e.g. group sizes).
    lines: join each series' points (False: scatter only).
  """
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  font, small = _font(14), _font(11)
  left, right, top, bottom = 70, width - 20, 40, height - 60
  xs = [v for s in series for v, e in zip(s['x'], s.get('xerr') or [0] * len(s['x'])) for v in (v - e, v + e)]
  ys = [v for s in series for v, e in zip(s['y'], s.get('yerr') or [0] * len(s['y'])) for v in (v - e, v + e)]
  xt = [v for v, _ in xticks] if xticks else _ticks(min(xs), max(xs))
  yt = _ticks(min(ys), max(ys))
  x0, x1 = min(xt + xs), max(xt + xs)
  y0, y1 = min(yt + ys), max(yt + ys)
  pad_x, pad_y = 0.05 * (x1 - x0 or 1), 0.05 * (y1 - y0 or 1)
  x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
  px = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
  py = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)

  draw.rectangle([left, top, right, bottom], outline='black')
  for value, text in (xticks or [(v, f'{v:g}') for v in xt]):
    if x0 <= value <= x1:
      draw.line([px(value), bottom, px(value), bottom + 5], fill='black')
      draw.text((px(value), bottom + 8), text, fill='black', font=small, anchor='mt')
  for value in yt:
    if y0 <= value <= y1:
      draw.line([left - 5, py(value), left, py(value)], fill='black')
      draw.line([left + 1, py(value), right - 1, py(value)], fill=(235, 235, 235))
      draw.text((left - 8, py(value)), f'{value:g}', fill='black', font=small, anchor='rm')
  draw.text(((left + right) / 2, 12), title, fill='black', font=font, anchor='mt')
  draw.text(((left + right) / 2, height - 22), xlabel, fill='black', font=font, anchor='mt')
  label_image = Image.new('RGB', (bottom - top, 20), 'white')
  ImageDraw.Draw(label_image).text(((bottom - top) / 2, 10), ylabel, fill='black', font=font, anchor='mm')
  image.paste(label_image.rotate(90, expand=True), (8, top))

  for index, s in enumerate(series):
    colour = COLOURS[index % len(COLOURS)]
    points = [(px(x), py(y)) for x, y in zip(s['x'], s['y'])]
    if lines and len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for i, (x, y) in enumerate(points):
      yerr = (s.get('yerr') or [0] * len(points))[i]
      xerr = (s.get('xerr') or [0] * len(points))[i]
      if yerr:
        draw.line([x, py(s['y'][i] - yerr), x, py(s['y'][i] + yerr)], fill=colour, width=1)
        draw.line([x - 4, py(s['y'][i] - yerr), x + 4, py(s['y'][i] - yerr)], fill=colour)
        draw.line([x - 4, py(s['y'][i] + yerr), x + 4, py(s['y'][i] + yerr)], fill=colour)
      if xerr:
        draw.line([px(s['x'][i] - xerr), y, px(s['x'][i] + xerr), y], fill=colour, width=1)
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
      if s.get('point_labels'):
        draw.text((x + 7, y - 7), s['point_labels'][i], fill=colour, font=small, anchor='lb')
    legend_y = top + 8 + 16 * index
    draw.rectangle([right - 170, legend_y, right - 160, legend_y + 10], fill=colour)
    draw.text((right - 154, legend_y + 5), s['label'], fill='black', font=small, anchor='lm')
  image.save(path)
  return path
