// Draft trees on the page: each verified block's ("round's") tokens grouped, its badge "accepted/nodes sent", its
// path in the hover title, and a running line under the answer. Reads `tandem.rounds` (docs/api.md); uses app.js's el.
"use strict";

const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");

function openRound(run, r, origins) {
  const t = run.tree || (run.tree = {rounds: 0, nodes: 0, chain: 0, taken: 0, line: null});
  t.rounds += 1;
  t.nodes += r.nodes;
  t.chain += r.chain;
  t.taken += r.branch > 0 ? 1 : 0;
  const side = r.nodes - r.chain;
  const off = origins.includes("b") ? plural(r.branch, "sibling") : plural(r.branch, "candidate token");
  const group = el("span", "round" + (r.branch ? " branched" : ""));
  group.title = "round " + t.rounds + ": " + plural(r.nodes, "node") + " sent (" + r.chain + " chain + " +
    plural(side, "sibling") + "), accepted " + (r.accepted - r.branch) + " of " + r.chain + " on the chain" +
    (r.branch ? ", then " + off : "") + "; " + plural(r.tokens, "token") + " emitted";
  Object.assign(group.dataset, {badge: r.accepted + "/" + r.nodes, nodes: r.nodes, chain: r.chain,
    accepted: r.accepted, branch: r.branch, tokens: r.tokens});
  run.answer.append(group);
  if (!t.line) {
    t.line = el("p", "tree-line");
    run.answer.after(t.line);
  }
  t.line.textContent = "draft tree: " + plural(t.rounds, "round") + ", " + plural(t.nodes, "node") + " sent (" +
    t.chain + " chain + " + plural(t.nodes - t.chain, "sibling") + "), " + plural(t.taken, "sibling") + " taken";
  Object.assign(run.article.dataset, {treeRounds: t.rounds, treeNodes: t.nodes, treeTaken: t.taken});
  return group;
}

// a chunk's pieces, each round's in its group; what no round claims (the target alone, text released at the end)
// goes straight into the answer
function placePieces(run, marks) {
  let i = 0;
  for (const r of marks.rounds || []) {
    const group = openRound(run, r, marks.origins.slice(i, i + r.tokens));
    for (const end = i + r.tokens; i < end && i < marks.pieces.length; i++) {
      addPiece(run, marks.pieces[i], marks.origins[i], group);
    }
  }
  for (; i < marks.pieces.length; i++) addPiece(run, marks.pieces[i], marks.origins[i]);
}
