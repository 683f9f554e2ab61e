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


def bar_plot(path, bars, ylabel, title, width=640, height=440):
  """Write a PNG bar chart.

  Args:
    bars: list of dicts with 'label', 'value' and optional 'err' (drawn as
      +- err) and 'colour' (an index into COLOURS).
  """
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  font, small = _font(14), _font(11)
  left, right, top, bottom = 70, width - 20, 40, height - 90
  ys = [0.0] + [b['value'] + sign * (b.get('err') or 0) for b in bars for sign in (-1, 1)]
  yt = _ticks(min(ys), max(ys))
  y0, y1 = min(yt + ys), max(yt + ys)
  py = lambda v: bottom - (v - y0) / ((y1 - y0) or 1) * (bottom - top)
  for value in yt:
    draw.line([left - 5, py(value), left, py(value)], fill='black')
    draw.line([left + 1, py(value), right - 1, py(value)], fill=(235, 235, 235))
    draw.text((left - 8, py(value)), f'{value:g}', fill='black', font=small, anchor='rm')
  draw.rectangle([left, top, right, bottom], outline='black')  # after the grid lines, which would hide its edges
  draw.text(((left + right) / 2, 12), title, fill='black', font=font, anchor='mt')
  label_image = Image.new('RGB', (bottom - top, 20), 'white')
  ImageDraw.Draw(label_image).text(((bottom - top) / 2, 10), ylabel, fill='black', font=font, anchor='mm')
  image.paste(label_image.rotate(90, expand=True), (8, top))
  slot = (right - left) / max(len(bars), 1)
  for index, b in enumerate(bars):
    colour = COLOURS[b.get('colour', index) % len(COLOURS)]
    x0, x1 = left + slot * (index + 0.2), left + slot * (index + 0.8)
    draw.rectangle([x0, min(py(0), py(b['value'])), x1, max(py(0), py(b['value']))], fill=colour)
    centre = (x0 + x1) / 2
    if b.get('err'):
      low, high = py(b['value'] - b['err']), py(b['value'] + b['err'])
      draw.line([centre, low, centre, high], fill='black')
      draw.line([centre - 5, low, centre + 5, low], fill='black')
      draw.line([centre - 5, high, centre + 5, high], fill='black')
    for line, text in enumerate(b['label'].split('\n')):
      draw.text((centre, bottom + 8 + 14 * line), text, fill='black', font=small, anchor='mt')
  image.save(path)
  return path


# --- Figures of the toy Table 1/2 sweep (experiments/table1.py) -----------------

TABLE2_BARS = (('sim_uc4', 'all'), ('sim_uc4_stage0.2', '0-0.2'), ('sim_uc4_stage0.4', '0-0.4'),
               ('sim_uc4_stage0.6', '0-0.6'), ('sim_uc4_stage0', 'none'), ('sim_uc4_no_first', 'no first\nblocks'),
               ('sim_uc4_no_last', 'no last\nblocks'))
# The diagnostics: the baseline (colour 0) and sim_uc4 (colour 1) at three guidance scales.
DIAGNOSTIC_BARS = (('baseline_cfg1', 'baseline\nCFG 1', 0), ('sim_uc4_cfg1', 'UC=4\nCFG 1', 1),
                   ('baseline_cfg1.5', 'baseline\nCFG 1.5', 0), ('sim_uc4_cfg1.5', 'UC=4\nCFG 1.5', 1),
                   ('baseline', 'baseline\nCFG 3', 0), ('sim_uc4', 'UC=4\nCFG 3', 1),
                   ('sim_uc4_stage0', 'UC=4 CFG 3\nno group attn', 1))


def _known(rows, *keys):
  return [r for r in rows if all(r.get(k) is not None for k in keys)]


def table1_figures(report, out, prefix='table1_'):
  """The sweep's PNGs from its report (experiments/table1_report.py); returns their paths.

  fd_vs_group_size (mean +- sd over seeds), s_cross_vs_fd (trajectory
  S_cross, Pearson r and n in the title), s_cross_per_stage,
  s_cross_per_layer, share_histogram (a_ij of the grouped Table 1 rows),
  table2_bars (FD of the Table 2 rows beside 'all' = sim_uc4),
  diagnostics_fd / diagnostics_class_accuracy (DIAGNOSTIC_BARS, once a
  diagnostic row has data). A figure whose rows have no data yet is left out.
  """
  rows = {r['name']: r for r in report['settings']}
  path = lambda name: f'{out}/{prefix}{name}.png'
  paths = []
  sim = _known([rows[n] for n in ('baseline', 'sim_uc2', 'sim_uc4', 'sim_uc8', 'sim_uc16') if n in rows], 'fd')
  if len(sim) >= 2:
    series = [{'label': 'similarity groups', 'x': [math.log2(r['group_size']) for r in sim],
               'y': [r['fd'] for r in sim], 'yerr': [r['fd_sd'] or 0 for r in sim]}]
    for name, label in (('random_uc4', 'random, UC=4'), ('class_uc4', 'class, UC=4'),
                        ('sim_uc4_tv100', 'similarity + sigma_tv 100, UC=4')):
      if name in rows:
        series.append({'label': label, 'x': [2.0], 'y': [rows[name]['fd']], 'yerr': [rows[name]['fd_sd'] or 0]})
    paths.append(plot(path('fd_vs_group_size'), series, 'unconditional group size UC (1 = baseline)',
                      'FD_toy (lower is better)', 'FD_toy vs group size (mean ± sd over seeds)',
                      xticks=[(math.log2(r['group_size']), str(r['group_size'])) for r in sim]))
  grouped = _known([r for r in report['settings'] if r['table'] == 1 and r['group_size'] > 1], 's_cross', 'fd')
  if len(grouped) >= 2:
    corr = report['correlation_s_cross_fd']['settings']
    title = 'S_cross (trajectory) vs FD_toy' + (f" (Pearson r = {corr['r']:.2f}, n = {corr['n']})"
                                               if corr['r'] is not None else '')
    series = [{'label': 'grouped settings', 'x': [r['s_cross'] for r in grouped], 'y': [r['fd'] for r in grouped],
               'xerr': [r['s_cross_sd'] or 0 for r in grouped], 'yerr': [r['fd_sd'] or 0 for r in grouped],
               'point_labels': [r['name'] for r in grouped]}]
    paths.append(plot(path('s_cross_vs_fd'), series, 'S_cross (%)', 'FD_toy (lower is better)', title,
                      lines=False))
  for key, xlabel, name in (('s_cross_per_stage', 'stage start (SiT time, 0 = noise)', 's_cross_per_stage'),
                            ('s_cross_per_layer', 'block', 's_cross_per_layer')):
    series = []
    for r in report['settings']:
      points = [(float(k), v) for k, v in (r.get(key) or {}).items() if v is not None]
      if points and r['group_size'] > 2:  # S_cross is 0 by definition for groups of 2
        series.append({'label': r['name'], 'x': [p[0] for p in points], 'y': [p[1] for p in points]})
    if series:
      paths.append(plot(path(name), series, xlabel, 'S_cross (%)', f"S_cross per {name.split('_')[-1]} "
                        "(trajectory, mean over seeds)"))
  series = []
  for r in grouped:
    histogram = r.get('share_histogram')
    if histogram and sum(histogram['counts']):
      edges, total = histogram['edges'], sum(histogram['counts'])
      series.append({'label': f"{r['name']} (uniform {r['uniform_share']:.2f})",
                     'x': [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])],
                     'y': [c / total for c in histogram['counts']]})
  if series:
    paths.append(plot(path('share_histogram'), series, 'a_ij (share of the other members)', 'fraction',
                      'Distribution of a_ij (trajectory, all probed steps and layers)'))
  table2 = [(n, label) for n, label in TABLE2_BARS if n in rows and rows[n]['fd'] is not None]
  if len(table2) >= 2:
    bars = [{'label': label, 'value': rows[n]['fd'], 'err': rows[n]['fd_sd'], 'colour': 0 if 'blocks' not in label
             else 1} for n, label in table2]
    paths.append(bar_plot(path('table2_bars'), bars, 'FD_toy (lower is better)',
                          'Table 2: group attention per stage / per block range (sim_uc4, mean ± sd)'))
  metrics = (('fd', 'FD_toy (lower is better)', 1), ('class_accuracy', 'class accuracy % (higher is better)', 100))
  for key, label, scale in metrics:
    found = [(n, text, colour) for n, text, colour in DIAGNOSTIC_BARS if n in rows and rows[n][key] is not None]
    # baseline and sim_uc4 alone are already in the other figures: draw this one once a diagnostic row has data.
    if len(found) >= 2 and any(n not in ('baseline', 'sim_uc4') for n, _, _ in found):
      bars = [{'label': text, 'value': scale * rows[n][key], 'colour': colour,
               'err': None if rows[n].get(f'{key}_sd') is None else scale * rows[n][f'{key}_sd']}
              for n, text, colour in found]
      paths.append(bar_plot(path(f'diagnostics_{key}'), bars, label,
                            'Diagnostics: baseline vs UC=4 by guidance scale (mean ± sd)'))
  return paths
