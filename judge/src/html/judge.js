// The side-by-side page of `align judge`: everything is drawn from the JSON
// in the "data" block, and every piece of data goes into the page through
// textContent or an attribute value, never as markup.
(function () {
  "use strict";
  var t0 = performance.now();
  window.addEventListener("error", function (e) {
    document.body.setAttribute("data-js-error", String(e.message || e));
  });
  var D = JSON.parse(document.getElementById("data").textContent);
  var S = D.summary, ROWS = D.rows;

  function el(tag, attrs, children) {
    var n = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (k === "text") n.textContent = attrs[k];
        else if (k === "cls") n.className = attrs[k];
        else n.setAttribute(k, attrs[k]);
      }
    }
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return n;
  }
  function pct(x) { return typeof x === "number" && isFinite(x) ? (100 * x).toFixed(1) + "%" : "n/a"; }
  function num(x) { return typeof x === "number" && isFinite(x) ? x.toFixed(1) : "n/a"; }
  function clen(s) { var n = 0; for (var _c of s) n++; return n; }
  function outcomeOf(r) { return r.outcome || "unparseable"; }
  function verdictText(v, candFirst) {
    if (!v) return "unparseable";
    if (v === "Tie") return "tie";
    var firstWins = v === "A";
    var cand = firstWins === candFirst;
    return v + " (" + (cand ? "candidate" : "baseline") + " better)";
  }

  function verdictShort(v, candFirst) {
    if (!v) return "unparseable";
    if (v === "Tie") return "tie";
    return v + " → " + ((v === "A") === candFirst ? "cand." : "base.");
  }

  // Rows with what filtering and sorting need, computed once.
  ROWS.forEach(function (r) {
    r._lc = clen(r.candidate); r._lb = clen(r.baseline); r._d = r._lc - r._lb;
    r._o = outcomeOf(r); r._cat = r.category === null || r.category === undefined ? "(none)" : r.category;
    r._hay = (r.prompt + "\n" + r.candidate + "\n" + r.baseline).toLowerCase();
  });

  // ---- Header -------------------------------------------------------------
  var root = document.getElementById("app");
  document.title = "Side-by-side: " + S.candidate + " vs " + S.baseline;
  root.appendChild(el("h1", { text: "Side-by-side: " + S.candidate + " vs " + S.baseline }));
  var meta = el("p", { cls: "meta" }, [
    "Judge ", el("code", { text: S.judge }),
    S.oracle ? ", oracle " : null, S.oracle ? el("code", { text: S.oracle }) : null,
    ". Every pair judged in both orders; disagreeing orders count as a tie. Win rate = (wins + ties/2)/n for the candidate, " +
      "95% bootstrap interval (" + S.bootstrap_resamples + " resamples, seed " + S.seed + ")."
  ]);
  root.appendChild(meta);
  if (!D.complete) {
    var msg = D.judged < D.total
      ? "Incomplete: judging stopped after " + D.judged + " of " + D.total + " prompts. The figures cover the judged prompts only (first attempts; no retries, no oracle)."
      : "Incomplete: all " + D.total + " prompts were judged once, but the run stopped before it finished (retries of unparseable verdicts, the oracle).";
    root.appendChild(el("div", { cls: "banner", id: "incomplete", text: msg }));
  }

  // ---- Figures --------------------------------------------------------------
  var O = S.overall, W = O;
  root.appendChild(el("h2", { text: "Figures" }));
  function card(k, v, s) { return el("div", { cls: "card" }, [el("div", { cls: "k", text: k }), el("div", { cls: "v", text: v }), s ? el("div", { cls: "s", text: s }) : null]); }
  var decided = ROWS.filter(function (r) { return (r._o === "win" || r._o === "loss") && r._d !== 0; });
  var longerWon = decided.filter(function (r) { return (r._o === "win") === (r._d > 0); }).length;
  var cards = [
    card("candidate win rate", pct(W.win_rate), "95% CI " + pct(W.lo) + " – " + pct(W.hi) + ", n " + W.n),
    card("wins / losses / ties", W.wins + " / " + W.losses + " / " + W.ties, O.excluded + " excluded (unparseable)"),
    card("position agreement", pct(O.order_agreement), "share of pairs whose two orders agreed"),
    card("mean answer length", num(O.lengths.candidate_chars) + " vs " + num(O.lengths.baseline_chars),
      "chars, candidate vs baseline (" + num(O.lengths.candidate_words) + " vs " + num(O.lengths.baseline_words) + " words)"),
    card("longer answer won", decided.length ? pct(longerWon / decided.length) : "n/a",
      "of " + decided.length + " decided pairs of different lengths")
  ];
  if (O.oracle_agreement !== undefined && O.oracle_agreement !== null) {
    cards.push(card("oracle agreement", pct(O.oracle_agreement), "judge's outcome = oracle's"));
  }
  if (O.oracle_score) {
    cards.push(card("oracle score", pct(O.oracle_score.candidate) + " vs " + pct(O.oracle_score.baseline), "candidate vs baseline, each on its own"));
  }
  if (O.human_agreement !== undefined && O.human_agreement !== null) {
    cards.push(card("human agreement", pct(O.human_agreement), "judge's outcome = the human label"));
  }
  root.appendChild(el("div", { cls: "cards", id: "figures" }, cards));

  // Win-rate bar with its interval, 0–100%, a line at 50% (plain boxes).
  function bar(w) {
    var box = el("div", { cls: "wbar" });
    function part(cls, left, width) {
      var d = el("div", { cls: cls });
      d.style.left = (100 * left).toFixed(2) + "%";
      if (width !== null) d.style.width = (100 * width).toFixed(2) + "%";
      box.appendChild(d);
    }
    var ok = function (x) { return typeof x === "number" && isFinite(x); };
    if (ok(w.win_rate)) part("fill", 0, w.win_rate);
    if (ok(w.lo) && ok(w.hi)) part("ci", w.lo, Math.max(w.hi - w.lo, 0.002));
    part("half", 0.5, null);
    return box;
  }
  var hasOracle = !!S.oracle;
  var head = ["category", "n", "win rate", "95% CI", "", "W / L / T", "excluded", "order agreement", "cand. chars", "base. chars"];
  if (hasOracle) head.push("oracle agreement");
  var cats = Object.keys(S.per_category);
  var catTable = el("table", { id: "categories" }, [el("thead", null, [el("tr", null, head.map(function (h, i) { return el("th", { cls: i === 0 || i === 4 ? "" : "num", text: h }); }))])]);
  var tb = el("tbody");
  function catRow(name, g) {
    var cells = [el("td", { text: name }), el("td", { cls: "num", text: String(g.n) }), el("td", { cls: "num", text: pct(g.win_rate) }),
      el("td", { cls: "num", text: pct(g.lo) + " – " + pct(g.hi) }), el("td", { cls: "bar" }, [bar(g)]),
      el("td", { cls: "num", text: g.wins + " / " + g.losses + " / " + g.ties }), el("td", { cls: "num", text: String(g.excluded) }),
      el("td", { cls: "num", text: pct(g.order_agreement) }), el("td", { cls: "num", text: num(g.lengths.candidate_chars) }),
      el("td", { cls: "num", text: num(g.lengths.baseline_chars) })];
    if (hasOracle) cells.push(el("td", { cls: "num", text: g.oracle_agreement === undefined || g.oracle_agreement === null ? "n/a" : pct(g.oracle_agreement) }));
    return el("tr", null, cells);
  }
  var uncategorised = cats.length === 1 && cats[0] === "(none)";
  if (!uncategorised) cats.forEach(function (c) { tb.appendChild(catRow(c, S.per_category[c])); });
  var ov = catRow("overall", O); ov.style.fontWeight = "600"; tb.appendChild(ov);
  catTable.appendChild(tb);
  root.appendChild(el("h2", { text: "Win rate by category" }));
  root.appendChild(catTable);
  root.appendChild(el("p", { cls: "muted", text: "Length bias: compare the answer lengths beside each win rate, and sort the prompts by length difference below; a judge that favours the longer answer shows wins tracking length." }));

  // ---- Controls -------------------------------------------------------------
  root.appendChild(el("h2", { text: "Prompts" }));
  var state = { q: "", cat: "", outcome: "", disagree: false, sort: "index", open: {} };
  var search = el("input", { type: "search", id: "search", placeholder: "Search prompts and answers", "aria-label": "search" });
  var catSel = el("select", { id: "category", "aria-label": "category" }, [el("option", { value: "", text: "all categories" })]);
  var catNames = Array.from(new Set(ROWS.map(function (r) { return r._cat; }))).sort();
  catNames.forEach(function (c) { catSel.appendChild(el("option", { value: c, text: c })); });
  var outSel = el("select", { id: "outcome", "aria-label": "outcome" }, [["", "all outcomes"], ["win", "candidate wins"], ["loss", "candidate loses"], ["tie", "tie"], ["unparseable", "unparseable"]].map(function (o) { return el("option", { value: o[0], text: o[1] }); }));
  var disBox = el("input", { type: "checkbox", id: "disagree" });
  var sortSel = el("select", { id: "sort", "aria-label": "sort" }, [["index", "prompt order"], ["len-desc", "length difference: candidate longer first"], ["len-asc", "length difference: baseline longer first"], ["len-abs", "largest length difference first"]].map(function (o) { return el("option", { value: o[0], text: o[1] }); }));
  var count = el("span", { cls: "count", id: "count" });
  root.appendChild(el("div", { cls: "controls" }, [search, catSel, outSel, el("label", null, [disBox, " orders disagree"]), el("label", null, ["sort: ", sortSel]), count]));

  var table = el("table", { id: "prompts" }, [el("thead", null, [el("tr", null, ["#", "category", "prompt", "outcome", "candidate first", "baseline first", "cand. chars", "base. chars", "Δ chars"].map(function (h, i) { return el("th", { cls: i >= 6 || i === 0 ? "num" : "", text: h }); }))])]);
  var body = el("tbody");
  table.appendChild(body);
  root.appendChild(table);

  function detail(r) {
    var td = el("td", { colspan: "9" });
    td.appendChild(el("div", { cls: "prompt-full" }, [el("strong", { text: "Prompt" }), el("pre", { text: r.prompt })]));
    if (r.reference !== null && r.reference !== undefined) td.appendChild(el("p", null, [el("strong", { text: "Reference: " }), el("code", { text: r.reference })]));
    td.appendChild(el("div", { cls: "sides" }, [
      el("div", { cls: "answer candidate" }, [el("h3", { text: "Candidate · " + S.candidate + " · " + r._lc + " chars" }), el("pre", { text: r.candidate })]),
      el("div", { cls: "answer baseline" }, [el("h3", { text: "Baseline · " + S.baseline + " · " + r._lb + " chars" }), el("pre", { text: r.baseline })])
    ]));
    function raw(title, o, candFirst) {
      var box = el("div", { cls: "raw" }, [el("strong", { text: title + ": " + verdictText(o.verdict, candFirst) })]);
      if (o.first_raw !== null && o.first_raw !== undefined) {
        box.appendChild(el("div", { cls: "first", text: "First attempt (unparseable, retried):" }));
        box.appendChild(el("pre", { cls: "first", text: o.first_raw }));
        box.appendChild(el("div", { cls: "first", text: "Retry:" }));
      }
      box.appendChild(el("pre", { text: o.raw }));
      return box;
    }
    td.appendChild(el("div", { cls: "verdicts" }, [raw("Candidate shown first (A)", r.candidate_first, true), raw("Baseline shown first (A)", r.baseline_first, false)]));
    var notes = ["Outcome for the candidate: " + r._o + (r.orders_agree === false ? " (the two orders disagree)" : "")];
    if (r.oracle_outcome !== undefined && r.oracle_outcome !== null) notes.push("Oracle: " + r.oracle_outcome);
    else if (hasOracle) notes.push("Oracle: n/a");
    if (r.human_outcome !== undefined && r.human_outcome !== null) notes.push("Human label: " + r.human_outcome);
    td.appendChild(el("p", { cls: "outcomes", text: notes.join(" · ") }));
    return el("tr", { cls: "detail", "data-index": String(r.index) }, [td]);
  }

  function row(r) {
    var tr = el("tr", { cls: "row" + (state.open[r.index] ? " open" : ""), "data-index": String(r.index), "data-category": r._cat, "data-outcome": r._o, "data-disagree": r.orders_agree === false ? "1" : "0" }, [
      el("td", { cls: "num", text: String(r.index + 1) }), el("td", { text: r._cat }),
      el("td", { cls: "trunc", title: r.prompt.slice(0, 500), text: r.prompt.slice(0, 200) }),
      el("td", null, [el("span", { cls: "badge " + r._o, text: r._o }), r.orders_agree === false ? el("span", { cls: "flag", title: "the two orders disagree", text: "⇄" }) : null]),
      el("td", { cls: "v", text: verdictShort(r.candidate_first.verdict, true) }),
      el("td", { cls: "v", text: verdictShort(r.baseline_first.verdict, false) }),
      el("td", { cls: "num", text: String(r._lc) }), el("td", { cls: "num", text: String(r._lb) }),
      el("td", { cls: "num", text: (r._d > 0 ? "+" : "") + r._d })
    ]);
    tr.addEventListener("click", function () {
      if (state.open[r.index]) delete state.open[r.index]; else state.open[r.index] = true;
      render(); save();
    });
    return tr;
  }

  function visible() {
    var q = state.q.toLowerCase();
    var v = ROWS.filter(function (r) {
      return (!state.cat || r._cat === state.cat) && (!state.outcome || r._o === state.outcome) &&
        (!state.disagree || r.orders_agree === false) && (!q || r._hay.indexOf(q) >= 0);
    });
    var by = { "len-desc": function (a, b) { return b._d - a._d; }, "len-asc": function (a, b) { return a._d - b._d; }, "len-abs": function (a, b) { return Math.abs(b._d) - Math.abs(a._d); } }[state.sort];
    return by ? v.slice().sort(function (a, b) { return by(a, b) || a.index - b.index; }) : v;
  }

  function render() {
    var v = visible();
    var frag = document.createDocumentFragment();
    v.forEach(function (r) { frag.appendChild(row(r)); if (state.open[r.index]) frag.appendChild(detail(r)); });
    body.textContent = "";
    body.appendChild(frag);
    count.textContent = "showing " + v.length + " of " + ROWS.length + " prompts" + (D.complete ? "" : " (of " + D.total + ")");
  }

  // The state in the URL fragment: #cat=math&outcome=win&disagree=1&q=…&sort=len-desc&open=0,3
  function load() {
    var h = location.hash.replace(/^#/, "");
    if (!h) return;
    h.split("&").forEach(function (kv) {
      var i = kv.indexOf("="), k = i < 0 ? kv : kv.slice(0, i), val = i < 0 ? "" : kv.slice(i + 1);
      try { val = decodeURIComponent(val.replace(/\+/g, " ")); } catch (e) { return; }
      if (k === "q") state.q = val;
      else if (k === "cat" || k === "category") state.cat = val;
      else if (k === "outcome") state.outcome = val;
      else if (k === "disagree") state.disagree = val === "1" || val === "true" || val === "";
      else if (k === "sort") state.sort = val;
      else if (k === "open") val.split(",").forEach(function (x) { if (x === "all") ROWS.forEach(function (r) { state.open[r.index] = true; }); else if (x !== "" && !isNaN(+x)) state.open[+x] = true; });
    });
  }
  function save() {
    var parts = [];
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    if (state.cat) parts.push("cat=" + encodeURIComponent(state.cat));
    if (state.outcome) parts.push("outcome=" + state.outcome);
    if (state.disagree) parts.push("disagree=1");
    if (state.sort !== "index") parts.push("sort=" + state.sort);
    var open = Object.keys(state.open);
    if (open.length) parts.push("open=" + open.join(","));
    try { history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search); } catch (e) { /* file: URLs in some browsers */ }
  }
  function sync() {
    search.value = state.q; catSel.value = state.cat; outSel.value = state.outcome;
    disBox.checked = state.disagree; sortSel.value = state.sort;
  }
  load(); sync();
  search.addEventListener("input", function () { state.q = search.value; render(); save(); });
  catSel.addEventListener("change", function () { state.cat = catSel.value; render(); save(); });
  outSel.addEventListener("change", function () { state.outcome = outSel.value; render(); save(); });
  disBox.addEventListener("change", function () { state.disagree = disBox.checked; render(); save(); });
  sortSel.addEventListener("change", function () { state.sort = sortSel.value; render(); save(); });
  window.addEventListener("hashchange", function () { state = { q: "", cat: "", outcome: "", disagree: false, sort: "index", open: {} }; load(); sync(); render(); });
  render();
  // A link that opens a row shows it.
  var first = body.querySelector("tr.detail");
  if (first && first.getBoundingClientRect().top > window.innerHeight - 120) first.previousSibling.scrollIntoView();
  window.addEventListener("load", function () {
    document.body.setAttribute("data-loaded-ms", performance.now().toFixed(1));
  });
  document.body.setAttribute("data-render-ms", (performance.now() - t0).toFixed(1));
  document.body.setAttribute("data-ready", "1");
})();
