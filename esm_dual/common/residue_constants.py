"""Residue geometry for ESMFold / AlphaFold2: atom orders, rigid groups, chi angles (numpy only).

The numeric tables (``chi_angles_atoms``, ``chi_angles_mask``, ``rigid_group_atom_positions``,
``residue_atoms``, ``atom_types``, ``restype_name_to_atom14_names``, ``restypes``) are data from
AlphaFold2 (Copyright 2021 DeepMind Technologies Limited) as redistributed in OpenFold (Copyright
2021 AlQuraishi Laboratory), both under the Apache License 2.0; the literature positions are from
Engh & Huber (2001). The derived arrays below are computed here from those tables.
"""

from __future__ import annotations

import numpy as np

# The 20 amino acids in AlphaFold order (3-letter codes sorted alphabetically); index 20 is unknown (X).
restypes: list[str] = list("ARNDCQEGHILKMFPSTWYV")
restype_order: dict[str, int] = {r: i for i, r in enumerate(restypes)}
restype_num = len(restypes)  # 20
unk_restype_index = restype_num
restypes_with_x: list[str] = restypes + ["X"]
restype_order_with_x: dict[str, int] = {r: i for i, r in enumerate(restypes_with_x)}

restype_1to3: dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU",
    "G": "GLY", "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE",
    "P": "PRO", "S": "SER", "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
restype_3to1: dict[str, str] = {v: k for k, v in restype_1to3.items()}
unk_restype = "UNK"
resnames: list[str] = [restype_1to3[r] for r in restypes] + [unk_restype]

# The 37 heavy-atom types of the atom37 representation.
atom_types: list[str] = [
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2",
    "ND1", "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2",
    "CH2", "NH1", "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
]
atom_order: dict[str, int] = {a: i for i, a in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37

# The compact atom14 encoding: per residue type, the atom in each of the 14 slots ("" = empty).
restype_name_to_atom14_names: dict[str, list[str]] = {
    "ALA": ["N", "CA", "C", "O", "CB", "", "", "", "", "", "", "", "", ""],
    "ARG": ["N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2", "", "", ""],
    "ASN": ["N", "CA", "C", "O", "CB", "CG", "OD1", "ND2", "", "", "", "", "", ""],
    "ASP": ["N", "CA", "C", "O", "CB", "CG", "OD1", "OD2", "", "", "", "", "", ""],
    "CYS": ["N", "CA", "C", "O", "CB", "SG", "", "", "", "", "", "", "", ""],
    "GLN": ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "NE2", "", "", "", "", ""],
    "GLU": ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "OE2", "", "", "", "", ""],
    "GLY": ["N", "CA", "C", "O", "", "", "", "", "", "", "", "", "", ""],
    "HIS": ["N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2", "", "", "", ""],
    "ILE": ["N", "CA", "C", "O", "CB", "CG1", "CG2", "CD1", "", "", "", "", "", ""],
    "LEU": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "", "", "", "", "", ""],
    "LYS": ["N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ", "", "", "", "", ""],
    "MET": ["N", "CA", "C", "O", "CB", "CG", "SD", "CE", "", "", "", "", "", ""],
    "PHE": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "", "", ""],
    "PRO": ["N", "CA", "C", "O", "CB", "CG", "CD", "", "", "", "", "", "", ""],
    "SER": ["N", "CA", "C", "O", "CB", "OG", "", "", "", "", "", "", "", ""],
    "THR": ["N", "CA", "C", "O", "CB", "OG1", "CG2", "", "", "", "", "", "", ""],
    "TRP": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"],
    "TYR": ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH", "", ""],
    "VAL": ["N", "CA", "C", "O", "CB", "CG1", "CG2", "", "", "", "", "", "", ""],
    "UNK": ["", "", "", "", "", "", "", "", "", "", "", "", "", ""],
}

# Heavy atoms of each residue type.
residue_atoms: dict[str, list[str]] = {
    "ALA": ["C", "CA", "CB", "N", "O"],
    "ARG": ["C", "CA", "CB", "CG", "CD", "CZ", "N", "NE", "O", "NH1", "NH2"],
    "ASP": ["C", "CA", "CB", "CG", "N", "O", "OD1", "OD2"],
    "ASN": ["C", "CA", "CB", "CG", "N", "ND2", "O", "OD1"],
    "CYS": ["C", "CA", "CB", "N", "O", "SG"],
    "GLU": ["C", "CA", "CB", "CG", "CD", "N", "O", "OE1", "OE2"],
    "GLN": ["C", "CA", "CB", "CG", "CD", "N", "NE2", "O", "OE1"],
    "GLY": ["C", "CA", "N", "O"],
    "HIS": ["C", "CA", "CB", "CG", "CD2", "CE1", "N", "ND1", "NE2", "O"],
    "ILE": ["C", "CA", "CB", "CG1", "CG2", "CD1", "N", "O"],
    "LEU": ["C", "CA", "CB", "CG", "CD1", "CD2", "N", "O"],
    "LYS": ["C", "CA", "CB", "CG", "CD", "CE", "N", "NZ", "O"],
    "MET": ["C", "CA", "CB", "CG", "CE", "N", "O", "SD"],
    "PHE": ["C", "CA", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "N", "O"],
    "PRO": ["C", "CA", "CB", "CG", "CD", "N", "O"],
    "SER": ["C", "CA", "CB", "N", "O", "OG"],
    "THR": ["C", "CA", "CB", "CG2", "N", "O", "OG1"],
    "TRP": ["C", "CA", "CB", "CG", "CD1", "CD2", "CE2", "CE3", "CZ2", "CZ3", "CH2", "N", "NE1", "O"],
    "TYR": ["C", "CA", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "N", "O", "OH"],
    "VAL": ["C", "CA", "CB", "CG1", "CG2", "N", "O"],
}

# The four atoms defining each chi angle (chi1..chi4, or a leading subset).
chi_angles_atoms: dict[str, list[list[str]]] = {
    "ALA": [],
    "ARG": [
        ["N", "CA", "CB", "CG"],
        ["CA", "CB", "CG", "CD"],
        ["CB", "CG", "CD", "NE"],
        ["CG", "CD", "NE", "CZ"],
    ],
    "ASN": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "OD1"]],
    "ASP": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "OD1"]],
    "CYS": [["N", "CA", "CB", "SG"]],
    "GLN": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "OE1"]],
    "GLU": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "OE1"]],
    "GLY": [],
    "HIS": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "ND1"]],
    "ILE": [["N", "CA", "CB", "CG1"], ["CA", "CB", "CG1", "CD1"]],
    "LEU": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    "LYS": [
        ["N", "CA", "CB", "CG"],
        ["CA", "CB", "CG", "CD"],
        ["CB", "CG", "CD", "CE"],
        ["CG", "CD", "CE", "NZ"],
    ],
    "MET": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "SD"], ["CB", "CG", "SD", "CE"]],
    "PHE": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    "PRO": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"]],
    "SER": [["N", "CA", "CB", "OG"]],
    "THR": [["N", "CA", "CB", "OG1"]],
    "TRP": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    "TYR": [["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    "VAL": [["N", "CA", "CB", "CG1"]],
}

# Which chi angles exist, per residue type in ``restypes`` order.
chi_angles_mask: list[list[float]] = [
    [0.0, 0.0, 0.0, 0.0],  # ALA
    [1.0, 1.0, 1.0, 1.0],  # ARG
    [1.0, 1.0, 0.0, 0.0],  # ASN
    [1.0, 1.0, 0.0, 0.0],  # ASP
    [1.0, 0.0, 0.0, 0.0],  # CYS
    [1.0, 1.0, 1.0, 0.0],  # GLN
    [1.0, 1.0, 1.0, 0.0],  # GLU
    [0.0, 0.0, 0.0, 0.0],  # GLY
    [1.0, 1.0, 0.0, 0.0],  # HIS
    [1.0, 1.0, 0.0, 0.0],  # ILE
    [1.0, 1.0, 0.0, 0.0],  # LEU
    [1.0, 1.0, 1.0, 1.0],  # LYS
    [1.0, 1.0, 1.0, 0.0],  # MET
    [1.0, 1.0, 0.0, 0.0],  # PHE
    [1.0, 1.0, 0.0, 0.0],  # PRO
    [1.0, 0.0, 0.0, 0.0],  # SER
    [1.0, 0.0, 0.0, 0.0],  # THR
    [1.0, 1.0, 0.0, 0.0],  # TRP
    [1.0, 1.0, 0.0, 0.0],  # TYR
    [1.0, 0.0, 0.0, 0.0],  # VAL
]

# Atom positions relative to their rigid group (0 backbone, 3 psi, 4-7 chi1-4), in Angstrom.
# Format: (atom name, rigid group index, (x, y, z)).
rigid_group_atom_positions: dict[str, list[tuple[str, int, tuple[float, float, float]]]] = {
    "ALA": [
        ("N", 0, (-0.525, 1.363, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, -0.0, -0.0)),
        ("CB", 0, (-0.529, -0.774, -1.205)),
        ("O", 3, (0.627, 1.062, 0.0)),
    ],
    "ARG": [
        ("N", 0, (-0.524, 1.362, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, -0.0, -0.0)),
        ("CB", 0, (-0.524, -0.778, -1.209)),
        ("O", 3, (0.626, 1.062, 0.0)),
        ("CG", 4, (0.616, 1.39, -0.0)),
        ("CD", 5, (0.564, 1.414, 0.0)),
        ("NE", 6, (0.539, 1.357, -0.0)),
        ("NH1", 7, (0.206, 2.301, 0.0)),
        ("NH2", 7, (2.078, 0.978, -0.0)),
        ("CZ", 7, (0.758, 1.093, -0.0)),
    ],
    "ASN": [
        ("N", 0, (-0.536, 1.357, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, -0.0, -0.0)),
        ("CB", 0, (-0.531, -0.787, -1.2)),
        ("O", 3, (0.625, 1.062, 0.0)),
        ("CG", 4, (0.584, 1.399, 0.0)),
        ("ND2", 5, (0.593, -1.188, 0.001)),
        ("OD1", 5, (0.633, 1.059, 0.0)),
    ],
    "ASP": [
        ("N", 0, (-0.525, 1.362, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.527, 0.0, -0.0)),
        ("CB", 0, (-0.526, -0.778, -1.208)),
        ("O", 3, (0.626, 1.062, -0.0)),
        ("CG", 4, (0.593, 1.398, -0.0)),
        ("OD1", 5, (0.61, 1.091, 0.0)),
        ("OD2", 5, (0.592, -1.101, -0.003)),
    ],
    "CYS": [
        ("N", 0, (-0.522, 1.362, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.524, 0.0, 0.0)),
        ("CB", 0, (-0.519, -0.773, -1.212)),
        ("O", 3, (0.625, 1.062, -0.0)),
        ("SG", 4, (0.728, 1.653, 0.0)),
    ],
    "GLN": [
        ("N", 0, (-0.526, 1.361, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, 0.0, 0.0)),
        ("CB", 0, (-0.525, -0.779, -1.207)),
        ("O", 3, (0.626, 1.062, -0.0)),
        ("CG", 4, (0.615, 1.393, 0.0)),
        ("CD", 5, (0.587, 1.399, -0.0)),
        ("NE2", 6, (0.593, -1.189, -0.001)),
        ("OE1", 6, (0.634, 1.06, 0.0)),
    ],
    "GLU": [
        ("N", 0, (-0.528, 1.361, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, -0.0, -0.0)),
        ("CB", 0, (-0.526, -0.781, -1.207)),
        ("O", 3, (0.626, 1.062, 0.0)),
        ("CG", 4, (0.615, 1.392, 0.0)),
        ("CD", 5, (0.6, 1.397, 0.0)),
        ("OE1", 6, (0.607, 1.095, -0.0)),
        ("OE2", 6, (0.589, -1.104, -0.001)),
    ],
    "GLY": [
        ("N", 0, (-0.572, 1.337, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.517, -0.0, -0.0)),
        ("O", 3, (0.626, 1.062, -0.0)),
    ],
    "HIS": [
        ("N", 0, (-0.527, 1.36, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, 0.0, 0.0)),
        ("CB", 0, (-0.525, -0.778, -1.208)),
        ("O", 3, (0.625, 1.063, 0.0)),
        ("CG", 4, (0.6, 1.37, -0.0)),
        ("CD2", 5, (0.889, -1.021, 0.003)),
        ("ND1", 5, (0.744, 1.16, -0.0)),
        ("CE1", 5, (2.03, 0.851, 0.002)),
        ("NE2", 5, (2.145, -0.466, 0.004)),
    ],
    "ILE": [
        ("N", 0, (-0.493, 1.373, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.527, -0.0, -0.0)),
        ("CB", 0, (-0.536, -0.793, -1.213)),
        ("O", 3, (0.627, 1.062, -0.0)),
        ("CG1", 4, (0.534, 1.437, -0.0)),
        ("CG2", 4, (0.54, -0.785, -1.199)),
        ("CD1", 5, (0.619, 1.391, 0.0)),
    ],
    "LEU": [
        ("N", 0, (-0.52, 1.363, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, -0.0, -0.0)),
        ("CB", 0, (-0.522, -0.773, -1.214)),
        ("O", 3, (0.625, 1.063, -0.0)),
        ("CG", 4, (0.678, 1.371, 0.0)),
        ("CD1", 5, (0.53, 1.43, -0.0)),
        ("CD2", 5, (0.535, -0.774, 1.2)),
    ],
    "LYS": [
        ("N", 0, (-0.526, 1.362, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, 0.0, 0.0)),
        ("CB", 0, (-0.524, -0.778, -1.208)),
        ("O", 3, (0.626, 1.062, -0.0)),
        ("CG", 4, (0.619, 1.39, 0.0)),
        ("CD", 5, (0.559, 1.417, 0.0)),
        ("CE", 6, (0.56, 1.416, 0.0)),
        ("NZ", 7, (0.554, 1.387, 0.0)),
    ],
    "MET": [
        ("N", 0, (-0.521, 1.364, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, 0.0, 0.0)),
        ("CB", 0, (-0.523, -0.776, -1.21)),
        ("O", 3, (0.625, 1.062, -0.0)),
        ("CG", 4, (0.613, 1.391, -0.0)),
        ("SD", 5, (0.703, 1.695, 0.0)),
        ("CE", 6, (0.32, 1.786, -0.0)),
    ],
    "PHE": [
        ("N", 0, (-0.518, 1.363, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.524, 0.0, -0.0)),
        ("CB", 0, (-0.525, -0.776, -1.212)),
        ("O", 3, (0.626, 1.062, -0.0)),
        ("CG", 4, (0.607, 1.377, 0.0)),
        ("CD1", 5, (0.709, 1.195, -0.0)),
        ("CD2", 5, (0.706, -1.196, 0.0)),
        ("CE1", 5, (2.102, 1.198, -0.0)),
        ("CE2", 5, (2.098, -1.201, -0.0)),
        ("CZ", 5, (2.794, -0.003, -0.001)),
    ],
    "PRO": [
        ("N", 0, (-0.566, 1.351, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.527, -0.0, 0.0)),
        ("CB", 0, (-0.546, -0.611, -1.293)),
        ("O", 3, (0.621, 1.066, 0.0)),
        ("CG", 4, (0.382, 1.445, 0.0)),
        ("CD", 5, (0.477, 1.424, 0.0)),
    ],
    "SER": [
        ("N", 0, (-0.529, 1.36, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, -0.0, -0.0)),
        ("CB", 0, (-0.518, -0.777, -1.211)),
        ("O", 3, (0.626, 1.062, -0.0)),
        ("OG", 4, (0.503, 1.325, 0.0)),
    ],
    "THR": [
        ("N", 0, (-0.517, 1.364, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.526, 0.0, -0.0)),
        ("CB", 0, (-0.516, -0.793, -1.215)),
        ("O", 3, (0.626, 1.062, 0.0)),
        ("CG2", 4, (0.55, -0.718, -1.228)),
        ("OG1", 4, (0.472, 1.353, 0.0)),
    ],
    "TRP": [
        ("N", 0, (-0.521, 1.363, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.525, -0.0, 0.0)),
        ("CB", 0, (-0.523, -0.776, -1.212)),
        ("O", 3, (0.627, 1.062, 0.0)),
        ("CG", 4, (0.609, 1.37, -0.0)),
        ("CD1", 5, (0.824, 1.091, 0.0)),
        ("CD2", 5, (0.854, -1.148, -0.005)),
        ("CE2", 5, (2.186, -0.678, -0.007)),
        ("CE3", 5, (0.622, -2.53, -0.007)),
        ("NE1", 5, (2.14, 0.69, -0.004)),
        ("CH2", 5, (3.028, -2.89, -0.013)),
        ("CZ2", 5, (3.283, -1.543, -0.011)),
        ("CZ3", 5, (1.715, -3.389, -0.011)),
    ],
    "TYR": [
        ("N", 0, (-0.522, 1.362, 0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.524, -0.0, -0.0)),
        ("CB", 0, (-0.522, -0.776, -1.213)),
        ("O", 3, (0.627, 1.062, -0.0)),
        ("CG", 4, (0.607, 1.382, -0.0)),
        ("CD1", 5, (0.716, 1.195, -0.0)),
        ("CD2", 5, (0.713, -1.194, -0.001)),
        ("CE1", 5, (2.107, 1.2, -0.002)),
        ("CE2", 5, (2.104, -1.201, -0.003)),
        ("OH", 5, (4.168, -0.002, -0.005)),
        ("CZ", 5, (2.791, -0.001, -0.003)),
    ],
    "VAL": [
        ("N", 0, (-0.494, 1.373, -0.0)),
        ("CA", 0, (0.0, 0.0, 0.0)),
        ("C", 0, (1.527, -0.0, -0.0)),
        ("CB", 0, (-0.533, -0.795, -1.213)),
        ("O", 3, (0.627, 1.062, -0.0)),
        ("CG1", 4, (0.54, 1.429, -0.0)),
        ("CG2", 4, (0.533, -0.776, 1.203)),
    ],
}

# Element symbol of each atom37 type (first letter of the name; no selenium in the 20 standard residues).
atom_elements: list[str] = [a[0] for a in atom_types]


# ================================================================================================
# Derived arrays (computed here): per residue type, atom14 <-> atom37 maps, masks, rigid-group frames
# ================================================================================================


def _frame_4x4(ex: np.ndarray, ey: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Homogeneous 4x4 frame whose x axis is along ``ex``, y axis in the (ex, ey) plane, at ``origin``."""
    x = ex / np.linalg.norm(ex)
    y = ey - np.dot(ey, x) * x  # Gram-Schmidt
    y = y / np.linalg.norm(y)
    z = np.cross(x, y)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, origin
    return m


def _build() -> dict[str, np.ndarray]:
    n_types = restype_num + 1  # + unknown, which has no atoms
    atom14_to_group = np.zeros((n_types, 14), dtype=np.int64)
    atom14_mask = np.zeros((n_types, 14), dtype=np.float32)
    atom14_positions = np.zeros((n_types, 14, 3), dtype=np.float32)
    atom37_mask = np.zeros((n_types, 37), dtype=np.float32)
    atom14_to_atom37 = np.zeros((n_types, 14), dtype=np.int64)
    atom37_to_atom14 = np.zeros((n_types, 37), dtype=np.int64)
    # Frames a residue type lacks (absent chi angles, every frame of X) stay all-zero, as in AlphaFold.
    default_frames = np.zeros((n_types, 8, 4, 4), dtype=np.float32)

    for r, letter in enumerate(restypes):
        name = restype_1to3[letter]
        slots = restype_name_to_atom14_names[name]
        for i, atom in enumerate(slots):
            if atom:
                atom14_to_atom37[r, i] = atom_order[atom]
                atom37_to_atom14[r, atom_order[atom]] = i
        for atom in residue_atoms[name]:
            atom37_mask[r, atom_order[atom]] = 1.0
        pos = {}
        for atom, group, xyz in rigid_group_atom_positions[name]:
            i = slots.index(atom)
            atom14_to_group[r, i] = group
            atom14_mask[r, i] = 1.0
            atom14_positions[r, i] = xyz
            pos[atom] = np.asarray(xyz, dtype=np.float64)

        # Frames of the 8 rigid groups relative to their parent: 0 backbone and 1 pre-omega are the
        # identity; 2 phi and 3 psi hang off the backbone; 4 chi1 off the backbone; 5-7 chi2-4 each off
        # the previous chi frame (whose origin is at the previous axis end atom).
        default_frames[r, 0] = default_frames[r, 1] = np.eye(4)
        default_frames[r, 2] = _frame_4x4(pos["N"] - pos["CA"], np.array([1.0, 0.0, 0.0]), pos["N"])
        default_frames[r, 3] = _frame_4x4(pos["C"] - pos["CA"], pos["CA"] - pos["N"], pos["C"])
        if chi_angles_mask[r][0]:
            a0, a1, a2 = (pos[a] for a in chi_angles_atoms[name][0][:3])
            default_frames[r, 4] = _frame_4x4(a2 - a1, a0 - a1, a2)
        for chi in range(1, 4):
            if chi_angles_mask[r][chi]:
                end = pos[chi_angles_atoms[name][chi][2]]
                default_frames[r, 4 + chi] = _frame_4x4(end, np.array([-1.0, 0.0, 0.0]), end)

    return dict(
        atom14_to_group=atom14_to_group, atom14_mask=atom14_mask, atom14_positions=atom14_positions,
        atom37_mask=atom37_mask, atom14_to_atom37=atom14_to_atom37, atom37_to_atom14=atom37_to_atom14,
        default_frames=default_frames,
    )


_derived = _build()
# [21, 8, 4, 4] frame of each rigid group relative to its parent (literature geometry).
restype_rigid_group_default_frame: np.ndarray = _derived["default_frames"]
# [21, 14] rigid group of each atom14 slot; [21, 14] 1 where the slot holds an atom.
restype_atom14_to_rigid_group: np.ndarray = _derived["atom14_to_group"]
restype_atom14_mask: np.ndarray = _derived["atom14_mask"]
# [21, 14, 3] atom positions in their rigid group's frame.
restype_atom14_rigid_group_positions: np.ndarray = _derived["atom14_positions"]
# [21, 37] 1 where the residue type has that atom; [21, 14] / [21, 37] index maps between encodings.
restype_atom37_mask: np.ndarray = _derived["atom37_mask"]
restype_atom14_to_atom37: np.ndarray = _derived["atom14_to_atom37"]
restype_atom37_to_atom14: np.ndarray = _derived["atom37_to_atom14"]
del _derived


def sequence_to_aatype(sequence: str) -> np.ndarray:
    """Residue letters -> AlphaFold residue indices [N]; anything not among the 20 maps to X (20)."""
    idx = [restype_order_with_x.get(c, unk_restype_index) for c in sequence.upper()]
    return np.array(idx, dtype=np.int64)


def aatype_to_sequence(aatype) -> str:
    return "".join(restypes_with_x[int(i)] for i in aatype)
